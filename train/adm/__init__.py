"""ADM-style pixel UNets: ``toolkit train adm`` (ADM, ADM-AT, ADM-IP), its losses, timestep sampler, presets and
its benchmark."""
