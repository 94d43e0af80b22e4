"""The SD-1.5-size benchmark's results as a table (docs/performance.md), and the checks on what the steps wrote."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

GB = 2**30
_TIMINGS = re.compile(r"in ([\d.]+) s \(text ([\d.]+) s, sampling ([\d.]+) s, decode ([\d.]+) s\)")


def generate_timings(log: str, steps: int = 4) -> dict | None:
    """The phases ``toolkit generate`` prints (runtime/cli_generate.py), plus sampling per step."""
    found = _TIMINGS.search(log)
    if found is None:
        return None
    total, text, sampling, decode = map(float, found.groups())
    return {"total_s": total, "text_s": text, "sampling_s": sampling, "decode_s": decode,
            "per_step_s": round(sampling / steps, 3)}


def directory_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def size_text(count: int) -> str:
    return f"{count / GB:.2f} GB" if count >= GB / 10 else f"{count / 2**20:.1f} MB"


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def load_images(path: Path) -> np.ndarray:
    """uint8 [N, H, W, 3]: a folder's PNGs in name order, or an .npy of one image [H, W, 3] (peers.py's)."""
    from PIL import Image
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path)[None]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(path.glob("*.png"))])


def image_agreement(first: Path, second: Path) -> dict:
    """PSNR and max pixel difference between two runs' images (same seeds, same order)."""
    try:
        a, b = load_images(first), load_images(second)
    except (OSError, ValueError) as exc:
        return {"compared": 0, "note": f"cannot read the images of {first} and {second}: {exc}"}
    if a.shape != b.shape:
        return {"compared": 0, "note": f"shapes differ: {a.shape} in {first}, {b.shape} in {second}"}
    return {"compared": len(a), "psnr_db": round(psnr(a, b), 2),
            "max_abs": int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())}


def _cell(step: dict) -> list[str]:
    if step.get("stopped"):
        outcome = f"stopped: {step['stopped']}"
    elif "ready_s" in step and step["returncode"] in (0, 143) and step.get("status") == 200:
        outcome = "ok"   # serve exits 128 + SIGTERM after its drain (uvicorn re-raises the signal it handled)
    elif step["returncode"] != 0:
        outcome = f"exit {step['returncode']} (log {Path(step['log']).name})"
    else:
        outcome = "ok"
    extra = []
    if "ready_s" in step:
        extra.append(f"ready after {step['ready_s']} s, one request {step.get('request_s', '-')} s "
                     f"(HTTP {step.get('status', '-')})")
    if "written_bytes" in step:
        extra.append(f"wrote {size_text(step['written_bytes'])}")
    for key in ("ort_vs_torch", "ort_vs_peer"):
        if step.get(key, {}).get("compared"):
            extra.append(f"vs our ORT image: PSNR {step[key]['psnr_db']} dB, max diff {step[key]['max_abs']}")
    if step.get("timings"):
        t = step["timings"]
        extra.append(f"generate {t['total_s']} s: text {t['text_s']}, 4 steps {t['sampling_s']} "
                     f"({t['per_step_s']} s each), decode {t['decode_s']}")
    if "peer" in step:
        extra.append(f"4 steps {step['peer']['end_to_end_s']} s, a later step {step['peer']['median_later_step_s']} s")
    return [outcome, f"{step['wall_s']:.0f}", f"{step['user_s'] + step['sys_s']:.0f}", f"{step['peak_rss_gb']:.2f}",
            f"{step['peak_tree_rss_gb']:.2f}", "; ".join(extra)]


def table(results: dict) -> str:
    """Markdown: one row per step, the command as typed, then the machine line."""
    rows = ["| step | command | result | wall s | CPU s | peak RSS GB | tree RSS GB | notes |",
            "|---|---|---|---|---|---|---|---|"]
    for name, step in results["steps"].items():
        command = " ".join(a if " " not in a else f'"{a}"' for a in step["argv"])
        rows.append("| " + " | ".join([name, f"`{command}`", *_cell(step)]) + " |")
    info = results["machine"]
    rows.append("")
    rows.append(f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB RAM, Python {info['python']}; "
                f"load average at start {', '.join(f'{x:.1f}' for x in info['load_average'])}.")
    return "\n".join(rows)
