"""The demo pipeline's data and parts, trained with the core trainer: Fashion-MNIST captions, the VAE, the
text-to-image teacher, the CLIP text encoder and eval's classifier."""
