"""Passive-to-active dense latent distillation: CanViT learns DINOv3's scene features from glimpses.

Paper
  [003] Berreby, Du, Durand, Krishna, "CanViT: Toward Active-Vision Foundation Models", Sec. 5
        and App. D (official pretraining code: m2b3/CanViT-pretrain).

A frozen DINOv3 teacher sees the whole scene once and gives a CLS token and one feature per
16 px patch (after its final LayerNorm). CanViT sees the scene only through a random sequence of
glimpses and must reconstruct, after every glimpse, the teacher's z-scored patch features from
its canvas (W_spatial) and its CLS from the recurrent CLS (W_global). Two rollouts per scene,
from the full scene (F-IID) and from a random crop (R-IID); truncated BPTT over chunks of K = 2
glimpses, the rollout going on after each chunk with probability 1/2. Teacher features come
from the teacher run in the loop (small data), or from float16 shards precomputed once
(`python train.py --cfg canvit.yaml --export_features DIR`), 4096 shuffled scenes a shard.

Shapes
  B scenes (per process), T glimpses, K chunk length, S scene side (px), G = S / 16 canvas and
  teacher grid side, Dt teacher width, gp glimpse side (px).

Paper -> code
  Sec. 5.1 teacher, D.2 precomputation   make_teacher, export_features, TeacherFeatures
  Sec. 5.1 target standardization        Distillation.setup (CanViT.fit_standardizers)
  Sec. 5.1 Eq. (2) decoding              CanViT.predict (canvit.py)
  Sec. 5.1 Eq. (3) loss                  reconstruction_loss
  Sec. 5.2 viewpoint sampling            canvit.random_viewpoints, rollout_viewpoints
  Sec. 5.2 dual rollouts, rollout length rollout_viewpoints, num_chunks
  Sec. 5.2 truncated BPTT                Distillation.train_step
  Table 2 hyperparameters                DistillConfig, train.OptimConfig

Run: `python train.py --cfg canvit_tiny.yaml` (tiny CanViT and teacher on synthetic scenes),
`python bench.py distill` (throughput, memory vs rollout length), `pytest tests/test_distill.py`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import canvit
import fovea


@dataclass
class TeacherConfig:
    weights: str = ""              # official DINOv3 .pth (e.g. dinov3_vitb16_pretrain_lvd1689m.pth); "" = random
    backbone: canvit.BackboneConfig = field(default_factory=canvit.BackboneConfig)  # [003] 5.1: ViT-B/16
    n_storage_tokens: int = 4      # DINOv3's register ("storage") tokens
    features: str = ""             # folder of precomputed shards; "" = run the teacher in the loop


@dataclass
class DistillConfig:
    model: canvit.CanViTConfig = field(default_factory=canvit.CanViTConfig)  # [003] Table 1: CanViT-B
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    glimpse_px: int = 128          # [003] Table 2: 128^2 px glimpses (8 x 8 patches)
    glimpse_method: str = "bilinear"  # "bilinear": the official glimpse | "integral": box filter (fovea)
    min_scale: float = 0.05        # [003] Table 2: s_min
    chunk: int = 2                 # [003] Table 2: TBPTT chunk size K
    p_stop: float = 0.5            # [003] Table 2: stop probability at a chunk boundary
    max_chunks: int = 64           # a cap on the geometric length (P(reach) = 2^-63 at p_stop 0.5)
    n_fiid: int = 1                # [003] Table 2: rollouts per step, 1 F-IID + 1 R-IID
    n_riid: int = 1
    n_stats: int = 4096            # [003] Sec. 5.1: scenes for the per-position z-scores
    shard_size: int = 4096         # [003] D.2: scenes per feature shard


# ---- Sec. 5.1: the teacher and the loss ------------------------------------------------------
class RandomTeacherWarning(UserWarning):
    """Distilling a randomly initialised teacher (no weights given)."""


def make_teacher(cfg: TeacherConfig) -> canvit.DINOv3ViT:
    """The frozen teacher: official DINOv3 weights from a path, or the passive ViT ("backbone")
    of a train.py `vit_sup` checkpoint (a teacher for a new domain), else random, loudly."""
    if cfg.weights:
        return canvit.load_teacher(cfg.weights, "distill.teacher.weights")
    warnings.warn("\n" + "!" * 78 + "\n!! the DINOv3 teacher is RANDOMLY INITIALISED (distill.teacher.weights"
                  "\n!! is empty). Distilling a random teacher only exercises the pipeline; set"
                  "\n!! --distill.teacher.weights=/path/to/dinov3_vitb16_pretrain_lvd1689m.pth\n"
                  + "!" * 78, RandomTeacherWarning, stacklevel=2)
    return canvit.DINOv3ViT(cfg.backbone, cfg.n_storage_tokens).eval().requires_grad_(False)


@torch.no_grad()
def teacher_features(teacher: canvit.DINOv3ViT, images: Tensor, grid: int | None = None
                     ) -> tuple[Tensor, Tensor]:
    """The teacher's CLS (B, Dt) and patch features (B, grid^2, Dt) after its final norm, in
    float32 (bf16 autocast on CUDA). grid: the patch grid wanted; a grid other than the scene's
    (S / patch) resizes the scene to grid patches a side."""
    if grid is not None and images.shape[-1] != grid * teacher.cfg.patch_size:
        px = grid * teacher.cfg.patch_size
        images = F.interpolate(images, size=(px, px), mode="bilinear", antialias=True, align_corners=False)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=images.is_cuda):
        out = teacher(images)
    return out["cls"].float(), out["patches"].float()


def reconstruction_loss(pred: canvit.Predictions, cls_target: Tensor, patch_target: Tensor
                        ) -> tuple[Tensor, Tensor]:
    """Eq. (3) for one timestep: (patch term, CLS term), targets z-scored, in float32.
    NOTE(paper): Eq. (3) writes squared norms (summed over features); as the official code, we
    average over features too (mse_loss): a 1 / Dt scale that matters to clipping (Table 2)."""
    patch = F.mse_loss(pred.patches.float(), patch_target)          # (B, G*G, Dt)
    cls = F.mse_loss(pred.cls.float(), cls_target)                    # (B, Dt)
    return patch, cls


# ---- Sec. 5.2: rollouts ----------------------------------------------------------------------
def num_chunks(gen: torch.Generator, p_stop: float, max_chunks: int) -> int:
    """Sec. 5.2: after each chunk the rollout stops with probability p_stop: a geometric count
    (mean 1 / p_stop chunks), shared by every rollout of the step."""
    n = 1
    while n < max_chunks and torch.rand((), generator=gen).item() >= p_stop:
        n += 1
    return n


def rollout_viewpoints(gen: torch.Generator, T: int, batch: int, n_fiid: int, n_riid: int,
                       min_scale: float) -> canvit.Viewpoint:
    """Viewpoints of every rollout of a step: centre (T, R * batch, 2), scale (T, R * batch),
    R = n_fiid + n_riid rollouts, F-IID ones first. All i.i.d. crops (p(s) ~ 1 - s, inside the
    scene) except t = 0 of an F-IID rollout, the full scene (0, 0, 1)."""
    R = n_fiid + n_riid
    vp = canvit.random_viewpoints(T * R * batch, gen, min_scale)
    center = vp.center_yx.view(T, R, batch, 2).clone()
    scale = vp.scale.view(T, R, batch).clone()
    center[0, :n_fiid] = 0.0
    scale[0, :n_fiid] = 1.0
    return canvit.Viewpoint(center.view(T, R * batch, 2), scale.view(T, R * batch))


class Distillation(nn.Module):
    """The objective of train.py for CanViT pretraining [003, Sec. 5]. Randomness (rollout
    length, viewpoints) is drawn for the global batch from a generator seeded by (seed, step),
    each process taking its scenes: the same on any number of processes and after a resume."""
    # One fixed view per scene, Resize + CenterCrop [003, Table 2; App. D.2], as the official
    # shards hold and the teacher in the loop sees: precomputing changes only the speed.
    augment = False

    def __init__(self, cfg: DistillConfig, seed: int):
        super().__init__()
        if cfg.glimpse_px % cfg.model.backbone.patch_size:
            raise ValueError(f"glimpse_px {cfg.glimpse_px} is not a multiple of the patch size "
                             f"{cfg.model.backbone.patch_size}")
        if cfg.glimpse_method not in ("bilinear", "integral"):
            raise ValueError(f"unknown glimpse_method {cfg.glimpse_method!r}; choose bilinear or integral")
        if cfg.n_fiid + cfg.n_riid < 1 or cfg.chunk < 1 or not 0 < cfg.p_stop <= 1:
            raise ValueError("need at least one rollout, chunk >= 1 and 0 < p_stop <= 1")
        self.cfg, self.seed = cfg, seed
        self.model = canvit.CanViT(cfg.model)
        # Precomputed features make the teacher unnecessary in the loop; a random one that made
        # them was saved beside them (export), so the checkpoint can keep it for evaluation.
        self.teacher = None if cfg.teacher.features else make_teacher(cfg.teacher)
        saved = Path(cfg.teacher.features) / "teacher.pt"
        self.exported_teacher = (torch.load(saved, weights_only=True)
                                 if cfg.teacher.features and not cfg.teacher.weights and saved.is_file() else None)
        if self.teacher is not None and self.teacher.cfg.embed_dim != cfg.model.teacher_dim:
            raise ValueError(f"the teacher is {self.teacher.cfg.embed_dim} wide but the student "
                             f"predicts model.teacher_dim = {cfg.model.teacher_dim}")

    def extra_state(self) -> dict:
        """For the checkpoint: a random teacher's weights (a downloaded one is found by its path)."""
        if self.cfg.teacher.weights:
            return {"teacher_weights": self.cfg.teacher.weights}
        if self.teacher is None:
            return {} if self.exported_teacher is None else {"teacher": self.exported_teacher}
        return {"teacher": self.teacher.state_dict()}

    def load_extra_state(self, extra: dict) -> None:
        if self.teacher is not None and "teacher" in extra:
            self.teacher.load_state_dict(extra["teacher"], strict=True)

    def export(self) -> dict:
        """The CanViT, and a random teacher (a downloaded one is found by its path in `extra`)."""
        parts = {"encoder": fovea.export_part(self.model, cfg=self.model.cfg)}
        t = self.cfg.teacher
        if self.teacher is not None and not t.weights:
            parts["teacher"] = fovea.export_part(self.teacher, cfg=t.backbone, n_storage_tokens=t.n_storage_tokens)
        elif self.exported_teacher is not None:
            parts["teacher"] = {"class": "DINOv3ViT", "state_dict": self.exported_teacher,
                                "args": {"cfg": dataclasses.asdict(t.backbone), "n_storage_tokens": t.n_storage_tokens}}
        return parts

    def training_data(self, dataset, rank: int, world: int, seed: int):
        """Precomputed teacher features, streamed shard by shard (None: the loop's default)."""
        if not self.cfg.teacher.features:
            return None
        features = TeacherFeatures(self.cfg.teacher.features, dataset)
        return features, ShardSampler(features.counts, features.shard_size, rank, world, seed)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()                                   # frozen, always
        return self

    def targets(self, batch: dict) -> tuple[Tensor, Tensor]:
        if "teacher_cls" in batch:                                # precomputed (float16 shards)
            return batch["teacher_cls"].float(), batch["teacher_patches"].float()
        return teacher_features(self.teacher, batch["image"])

    @torch.no_grad()
    def setup(self, dataset) -> None:
        """Sec. 5.1: per-position mean and variance of the teacher's features over n_stats scenes
        (the first scenes of a fixed shuffle; shards are shuffled already)."""
        n = min(self.cfg.n_stats, len(dataset))
        order = (range(n) if isinstance(dataset, TeacherFeatures)
                 else torch.randperm(len(dataset), generator=torch.Generator().manual_seed(self.seed))[:n].tolist())
        device = self.model.canvas_spatial_init.device
        cls, patches = [], []
        read = dataset.features if isinstance(dataset, TeacherFeatures) else dataset.__getitem__
        for start in range(0, n, 64):
            items = [read(i) for i in order[start:start + 64]]
            items = [it for it in items if it is not None and "bad" not in it]
            batch = {k: torch.stack([it[k] for it in items]).to(device)
                     for k in items[0] if torch.is_tensor(items[0][k])}
            c, p = self.targets(batch)
            cls.append(c.cpu())
            patches.append(p.cpu())
        self.model.fit_standardizers(torch.cat(cls), torch.cat(patches))

    def train_step(self, batch: dict, step: int, run) -> dict:
        """Dual rollouts of a random length with truncated BPTT, one update (train.py's interface)."""
        cfg, model, rank, world = self.cfg, self.model, run.rank, run.world
        images = batch["image"]
        B, S = images.shape[0], images.shape[-1]
        G = S // cfg.model.backbone.patch_size                    # canvas grid = teacher grid
        cls_t, patch_t = self.targets(batch)                      # (B, Dt), (B, G*G, Dt)
        if patch_t.shape[1] != G * G:
            raise ValueError(f"teacher features hold {patch_t.shape[1]} patches, a {S} px scene has "
                             f"{G}x{G}: were they exported at another image size?")
        cls_t, patch_t = model.standardize_targets(cls_t, patch_t)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        T = cfg.chunk * num_chunks(gen, cfg.p_stop, cfg.max_chunks)
        R = cfg.n_fiid + cfg.n_riid
        vp = rollout_viewpoints(gen, T, B * world, cfg.n_fiid, cfg.n_riid, cfg.min_scale)
        # This process's scenes within each rollout: global sample j = rank * B + i.
        mine = (torch.arange(R)[:, None] * B * world + rank * B + torch.arange(B)[None]).view(-1)
        vp = canvit.Viewpoint(vp.center_yx[:, mine].to(images.device), vp.scale[:, mine].to(images.device))
        # All rollouts as one batch of R*B (same length), rollout r on scene b at row r*B + b.
        if cfg.glimpse_method == "integral":                      # R rows share each scene's table
            source = fovea.integral_image(images).select(torch.arange(B).repeat(R))
        else:
            source = images.repeat(R, 1, 1, 1)                    # (R*B, 3, S, S)
        cls_t, patch_t = cls_t.repeat(R, 1), patch_t.repeat(R, 1, 1)
        state = model.init_state(R * B, G)
        sums = torch.zeros(3, device=images.device)               # loss, patch, cls (detached)
        for t0 in range(0, T, cfg.chunk):                         # truncated BPTT, chunks of K
            chunk_loss = 0.0
            for t in range(t0, t0 + cfg.chunk):
                with run.autocast():
                    v = canvit.Viewpoint(vp.center_yx[t], vp.scale[t])
                    glimpse = fovea.viewpoint_glimpse(source, v.center_yx, v.scale, cfg.glimpse_px)
                    state = model(glimpse, state, v.center_yx, v.scale).state
                    patch, cls = reconstruction_loss(model.predict(state), cls_t, patch_t)
                chunk_loss = chunk_loss + patch + cls
                sums += torch.stack([patch + cls, patch, cls]).detach()
            (chunk_loss / T).backward()                           # Eq. (3): mean over time
            state = state.detach()                                # no gradient across chunks
        run.optimizer_step()
        loss, patch, cls = sums / T
        return {"loss": loss, "patch_loss": patch, "cls_loss": cls,
                "rollout_len": torch.tensor(float(T)), "glimpses": R * B * T}


# ---- App. D.2: teacher features precomputed into float16 shards ------------------------------
def shard_path(folder: str | Path, k: int) -> Path:
    return Path(folder) / f"shard_{k:06d}.pt"


@torch.no_grad()
def export_features(teacher: nn.Module, dataset, folder: str | Path, shard_size: int = 4096,
                    seed: int = 0, rank: int = 0, world: int = 1, batch_size: int = 64,
                    num_workers: int = 4, collate=None) -> list[int]:
    """Write the teacher's CLS and patch features of every scene of `dataset` into shards, each
    {"index": (n,) int64 dataset indices, "cls": (n, Dt) float16, "patches": (n, G*G, Dt)
    float16}; returns the shards this process wrote. The scenes are shuffled once (seeded): shard
    k holds perm[k*n:(k+1)*n], shards in order are a random order. Shard k is written by process
    k % world, atomically (a temporary file renamed); shards on disk are kept: an export resumes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    n_shards = math.ceil(len(dataset) / shard_size)
    device = next(teacher.parameters()).device
    written = []
    for k in range(rank, n_shards, world):
        if shard_path(folder, k).exists():
            continue
        idx = perm[k * shard_size:(k + 1) * shard_size]
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx.tolist()),
                                             batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=collate)
        kept, cls, patches = [], [], []
        for batch in loader:                                      # bad images are dropped by collate
            if "image" not in batch:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = teacher(batch["image"].to(device))
            kept.append(batch["index"])
            cls.append(out["cls"].half().cpu())
            patches.append(out["patches"].half().cpu())
        tmp = shard_path(folder, k).with_suffix(".tmp")
        torch.save({"index": torch.cat(kept), "cls": torch.cat(cls), "patches": torch.cat(patches)}, tmp)
        os.replace(tmp, shard_path(folder, k))
        written.append(k)
    return written


def write_index(folder: str | Path, n_shards: int, meta: dict) -> None:
    """After every shard is written: index.json with each shard's scene count (atomic)."""
    folder = Path(folder)
    counts = []
    for k in range(n_shards):
        shard = torch.load(shard_path(folder, k), mmap=True, weights_only=True)
        counts.append(int(shard["index"].shape[0]))
    tmp = folder / "index.json.tmp"
    tmp.write_text(json.dumps({**meta, "shards": counts}, indent=1))
    os.replace(tmp, folder / "index.json")


class TeacherFeatures(torch.utils.data.Dataset):
    """Scenes with their precomputed teacher features, by position in the shards: item p is row
    p % n of shard p // n, the scene `dataset[index[row]]` plus `teacher_cls` (Dt,) and
    `teacher_patches` (G*G, Dt) float16. Shards are memory-mapped, one open at a time per worker:
    reading positions in order streams the shards."""
    def __init__(self, folder: str | Path, dataset):
        self.folder, self.dataset = Path(folder), dataset
        index_file = self.folder / "index.json"
        if not index_file.is_file():
            raise FileNotFoundError(f"{index_file} not found: export the features first "
                                    f"(python train.py --cfg ... --export_features {folder})")
        self.meta = json.loads(index_file.read_text())
        self.counts = self.meta["shards"]
        self.shard_size = self.meta["shard_size"]
        if self.meta["dataset_len"] != len(dataset):
            raise ValueError(f"the features in {folder} were exported for {self.meta['dataset_len']} "
                             f"scenes, the dataset has {len(dataset)}")
        self._open: tuple[int, dict] | None = None

    def __len__(self) -> int:
        return sum(self.counts)

    def _row(self, p: int) -> tuple[dict, int]:
        k, row = divmod(p, self.shard_size)
        if self._open is None or self._open[0] != k:
            self._open = (k, torch.load(shard_path(self.folder, k), mmap=True, weights_only=True))
        return self._open[1], row

    def features(self, p: int) -> dict:
        """Only the teacher features of position p (no image decoding)."""
        shard, row = self._row(p)
        return {"teacher_cls": shard["cls"][row].clone(), "teacher_patches": shard["patches"][row].clone()}

    def __getitem__(self, p: int) -> dict:
        shard, row = self._row(p)
        item = self.dataset[int(shard["index"][row])]
        if item is None or "bad" in item:
            return item
        return {**item, **self.features(p)}


class ShardSampler(torch.utils.data.Sampler):
    """Positions in shard order: process r reads shards r, r + world, ... (their order shuffled
    per epoch), rows in order within a shard. `skip` starts into the epoch (resume)."""
    def __init__(self, counts: list[int], shard_size: int, rank: int, world: int, seed: int):
        if len(counts) < world:
            raise ValueError(f"{len(counts)} shards cannot feed {world} processes")
        self.counts, self.shard_size = counts, shard_size
        self.rank, self.world, self.seed = rank, world, seed
        self.epoch, self.skip = 0, 0
        per = len(counts) // world                                # equal shard counts per process
        self.shards = list(range(rank, per * world, world))
        # Every process must run as many steps per epoch: cut to the smallest share.
        self.num_samples = min(sum(counts[k] for k in range(r, per * world, world)) for r in range(world))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        order = [self.shards[i] for i in torch.randperm(len(self.shards), generator=gen).tolist()]
        positions = [k * self.shard_size + r for k in order for r in range(self.counts[k])]
        return iter(positions[self.skip:self.num_samples])

    def __len__(self) -> int:
        return self.num_samples - self.skip
