"""Training throughput, data-pipeline throughput and OOF size per image.

Run:  .venv/bin/python benchmarks/bench_train.py [--steps 3] [--batch-sizes 8] [--workers 0,2] [--skip-oof]

1. Train-step images/s and peak GPU memory for (FPN, se_resnext50_32x4d) and (Unet, resnet34) on
   256x512 crops per batch size: fp32 (the baseline a careful user starts from) vs bf16 autocast +
   channels_last on CUDA when a GPU is visible; CPU fp32 otherwise (the AMP row is marked n/a).
2. The data pipeline (JPEG decode + RLE decode + crop/flip/brightness augmentations) in
   images/s for one worker, and through a DataLoader with ``--workers`` workers (batch 16),
   printed beside the fastest GPU step rate of (1): the loader keeps up when it is the larger.
3. OOF bytes per image per model (zstd Parquet), full resolution and 4x-downsampled, from a
   small model trained briefly on a 256x1600 synthetic set.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

from steel_ray import synth
from steel_ray.config import TrialConfig
from steel_ray.data import load_train
from steel_ray.dataset import SteelDataset, build_transforms
from steel_ray.infer import autocast
from steel_ray.losses import build_loss
from steel_ray.models import build_model


def train_step_rate(arch, encoder, device, amp, steps, batch=8, crop=(256, 512)):
    """(images/s, peak GPU memory GiB or nan) of training steps."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.cuda.empty_cache()  # the previous row's tensors are gone with its call
        torch.cuda.reset_peak_memory_stats()
    cfg = TrialConfig.from_dict({"arch": arch, "encoder": encoder, "loss": "bce_dice"})
    model = build_model(cfg.model).to(device).train()
    if amp:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = build_loss(cfg.loss)
    x = torch.randn(batch, 3, *crop, device=device)
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    y = (torch.rand(batch, 4, *crop, device=device) > 0.9).float()
    scaler = torch.amp.GradScaler("cuda", enabled=amp and not torch.cuda.is_bf16_supported())

    def step():
        with autocast(device, amp):
            logits, _ = model(x)
        loss, _ = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    for _ in range(2):  # warm-up (cudnn autotune, allocator)
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    rate = batch * steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return rate, peak


def pipeline_rate(data_dir, n=60):
    ts = load_train(data_dir)
    tf = build_transforms(True, crop=(256, 512))
    tf.set_random_seed(0)
    ds = SteelDataset(ts.images_dir, ts.image_ids, ts.rles, ts.shape, tf)
    ds[0]
    t0 = time.perf_counter()
    for i in range(n):
        ds[i % len(ds)]
    return n / (time.perf_counter() - t0)


def loader_rate(data_dir, workers: int, batch: int = 16, batches: int = 12):
    """Images/s through a DataLoader with ``workers`` workers (what feeds the GPU in a trial)."""
    from torch.utils.data import DataLoader

    ts = load_train(data_dir)
    ds = SteelDataset(ts.images_dir, ts.image_ids, ts.rles, ts.shape, build_transforms(True, crop=(256, 512)))
    dl = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=torch.cuda.is_available(),
                    persistent_workers=workers > 0)
    it = iter(dl)
    next(it)  # start-up (worker processes)
    t0, n = time.perf_counter(), 0
    for _ in range(batches):
        try:
            n += len(next(it)["image"])
        except StopIteration:
            it = iter(dl)
    return n / (time.perf_counter() - t0)


def oof_bytes(data_dir, run_dir):
    from steel_ray.train import fit_fold, prepare_run

    cfg = TrialConfig.from_dict({"arch": "FPN", "encoder": "tu-test_efficientnet", "epochs": 2, "batch_size": 8,
                                 "resize_height": 128, "resize_width": 800, "crop_height": 128, "crop_width": 256, "lr": 3e-3})
    data = prepare_run(data_dir, run_dir, 3)
    res = fit_fold(cfg, 0, data, run_dir, progress=False)
    md = pq.ParquetFile(res.oof_path).metadata
    sizes = {}
    for rg in range(md.num_row_groups):
        g = md.row_group(rg)
        for c in range(g.num_columns):
            col = g.column(c)
            sizes[col.path_in_schema] = sizes.get(col.path_in_schema, 0) + col.total_compressed_size
    n = md.num_rows
    full = sum(sizes[f"p{c}"] for c in range(1, 5)) / n
    ds4 = sum(sizes[f"p{c}_ds4"] for c in range(1, 5)) / n
    return full, ds4, n


def _space_finetune_batch():
    import yaml

    return yaml.safe_load(open(Path(__file__).resolve().parents[1] / "search_spaces" / "severstal.yaml"))["fixed"].get(
        "finetune_batch_size")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed train steps per row")
    ap.add_argument("--batch-sizes", default="8", help="comma list of batch sizes (default 8; the GPU check uses 16,32)")
    ap.add_argument("--workers", default="0,2", help="comma list of DataLoader worker counts for the loader rate")
    ap.add_argument("--skip-oof", action="store_true")
    ap.add_argument("--finetune-batch-sizes", default="",
                    help="comma list: also the full-size fine-tuning step (256x1600, bf16 + channels_last) at these batch "
                         "sizes, its peak memory beside severstal.yaml's finetune_batch_size (CUDA only)")
    a = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    hw = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {hw}, torch {torch.__version__}")
    print(f"\n{'model':30}{'batch':>6}{'fp32 img/s':>12}{'bf16+CL img/s':>15}{'ratio':>8}{'peak GiB fp32/bf16':>21}")
    best_gpu = 0.0
    for arch, enc in (("FPN", "se_resnext50_32x4d"), ("Unet", "resnet34")):
        for bs in [int(b) for b in a.batch_sizes.split(",")]:
            base, mem = train_step_rate(arch, enc, device, False, a.steps, batch=bs)
            if device.type == "cuda":
                fast, mem_f = train_step_rate(arch, enc, device, True, a.steps, batch=bs)
                best_gpu = max(best_gpu, fast)
                print(f"{arch + ' ' + enc:30}{bs:6d}{base:12.2f}{fast:15.2f}{fast / base:7.2f}x{mem:10.2f} / {mem_f:.2f}")
            else:
                print(f"{arch + ' ' + enc:30}{bs:6d}{base:12.2f}{'n/a':>15}{'':>8}{'n/a':>21}")
    if a.finetune_batch_sizes and device.type == "cuda":
        print(f"\nfull-size fine-tuning step (256x1600, bf16 + channels_last); severstal.yaml: finetune_batch_size "
              f"{_space_finetune_batch()} of batch_size 8 at 256x512-800 crops")
        print(f"{'model':30}{'batch':>6}{'img/s':>10}{'peak GiB':>10}")
        for arch, enc in (("FPN", "se_resnext50_32x4d"), ("Unet", "efficientnet-b5")):
            for bs in [int(b) for b in a.finetune_batch_sizes.split(",")]:
                try:
                    rate, mem = train_step_rate(arch, enc, device, True, a.steps, batch=bs, crop=(256, 1600))
                    print(f"{arch + ' ' + enc:30}{bs:6d}{rate:10.2f}{mem:10.2f}")
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    print(f"{arch + ' ' + enc:30}{bs:6d}{'out of memory':>20}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synth.generate(data, n_train=48, n_test=1, height=256, width=1600, seed=0)
        rate = pipeline_rate(data)
        print(f"\ndata pipeline (256x1600 JPEG -> 256x512 crop + flips + brightness/contrast): {rate:.1f} images/s per worker")
        for nw in [int(w) for w in a.workers.split(",")]:
            lr = loader_rate(data, nw)
            vs = f" vs GPU step rate {best_gpu:.1f} img/s: {'keeps up' if lr >= best_gpu else 'too slow'}" if best_gpu else ""
            print(f"  DataLoader, {nw} worker(s), batch 16: {lr:.1f} images/s{vs}")
        if not a.skip_oof:
            full, ds4, n = oof_bytes(data, Path(tmp) / "run")
            print(f"\nOOF bytes per image per model (zstd, {n} images, 4 classes): full {full / 1024:.1f} KiB, ds4 {ds4 / 1024:.1f} KiB"
                  f" (raw uint8: {4 * 256 * 1600 / 1024:.0f} KiB / {4 * 64 * 400 / 1024:.0f} KiB)")
            print(f"  -> 12,568 images: full {full * 12568 / 2**30:.2f} GiB, ds4 {ds4 * 12568 / 2**30:.3f} GiB per model")
    print(f"\nreproduce: .venv/bin/python benchmarks/bench_train.py --steps {a.steps} --batch-sizes {a.batch_sizes} "
          f"--workers {a.workers}{' --skip-oof' if a.skip_oof else ''}")


if __name__ == "__main__":
    main()
