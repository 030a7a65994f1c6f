"""Pretrain the `mini` SD3-architecture pipeline on the procedural world, on a CPU.

    python -m apexcli.tools.mini_pretrain --out runs/mini-pretrain --minutes 53 --seed 0 \
        --export src/apexcli/models/mini

Two phases and an optional third, one process, deterministic from the seed (given the number of
steps reached):
  1. the VAE (AutoencoderKL, 4x downsampling) on ground-truth renders: L1 + MSE + a tiny KL
     term; then its latent shift/scale are measured as SD3 does (mean and 1/std of latents);
  2. the flow transformer (SD3Transformer2DModel) and the three text encoders jointly, by
     rectified-flow matching: x_t = (1-t) x0 + t eps, target eps - x0, t ~ logit-normal(0, 1),
     with the prompt dropped (replaced by "") 10% of the time so classifier-free guidance works,
     and an EMA of the weights, which is what is exported;
  3. optional (`noisy_steps` > 0, off for the shipped model): the EMA model, rounded to fp16,
     trains on with renders that contradict their prompts now and then (`grammar.mislabel`),
     as noisy web captions do; `--init DIR` runs only this phase, from an existing export.
The learning rate is constant after a warm-up, so a run cut by --minutes holds exactly the
weights a run with --flow-steps set to the same count would; `loss.jsonl` records every step.
Every --export-every minutes (and at the end) the EMA pipeline is written in diffusers' layout
(fp16 safetensors) to --export, via a temporary directory and a rename, plus a sample grid.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from PIL import Image
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from apexcli.fileio import atomic_directory
from apexcli.images import image_grid
from apexcli.models.tiny import assemble_sd3_pipeline, build_char_tokenizer
from apexcli.world.grammar import (
    mislabel,
    parse_prompt,
    sample_split_scene,
    scene_to_prompt,
)
from apexcli.world.grammar import prompts as world_prompts
from apexcli.world.render import render

RESOLUTION = 64
MAX_TOKENS = 48  # longest prompt of the grammar is 46 characters + <bos> <eos>


@dataclass
class MiniConfig:
    """Sizes and training settings of the mini pipeline (defaults: the shipped model)."""

    seed: int = 0
    # The shipped model is pinned by step counts, so it reproduces on a machine of any speed; the
    # clock budgets are caps for shorter experiments (a cut run equals a step-pinned one, see docs).
    minutes: float = 240.0  # wall-clock cap for both phases together
    # VAE
    vae_channels: tuple[int, ...] = (16, 32)  # 2 blocks: one downsampling, 64 px -> 32x32 latents
    latent_channels: int = 4
    vae_steps: int = 1487  # where the shipped run's 9-minute clock stopped it (found by retraining)
    vae_minutes: float = 60.0  # the VAE phase stops at whichever comes first
    vae_lr: float = 2e-3
    vae_batch: int = 8
    vae_crop: int = 48  # the VAE is convolutional: random crops are cheaper than whole images
    vae_sign_fraction: float = 0.25  # signs are mostly white, black and sky: the colours need the data
    vae_kl: float = 1e-6
    # transformer
    layers: int = 6
    patch: int = 4  # 32x32 latents / 4 = 8x8 = 64 image tokens
    heads: int = 4
    head_dim: int = 32
    text_hidden: int = 64  # CLIP-L / CLIP-G width; T5 width (and joint_attention_dim) is twice this
    # 4 036: OCR 0.71 on held-out signs; 1 000 steps more read 0.89, too little left to learn
    flow_steps: int = 4036
    flow_lr: float = 8e-4
    flow_batch: int = 8
    warmup: int = 100
    ema: float = 0.995  # a horizon of ~200 steps: a CPU run makes only a few thousand
    prompt_dropout: float = 0.1
    sign_fraction: float = 0.5  # 0.6 left shapes as fragments after 2 672 steps
    # caption noise: after the clean phase, the EMA model (rounded to fp16, as shipped) trains on
    # for noisy_steps on renders that contradict their prompts now and then (grammar.mislabel),
    # as web captions do; so the base model follows prompts only partly, and RL has a choice of
    # the right mode to reinforce rather than a skill to invent (docs/method/mini-world.md)
    noisy_steps: int = 0
    attribute_noise: float = 0.3  # each stated shapes attribute wrong with this probability
    letter_noise: float = 0.15  # each letter of a sign wrong with this probability
    # sampling defaults written into the scheduler / used for grids
    shift: float = 2.0
    guidance: float = 4.0
    sample_steps: int = 10
    export_every: float = 10.0  # minutes


def build_mini_pipeline(cfg: MiniConfig) -> StableDiffusion3Pipeline:
    """The untrained mini pipeline (random weights, deterministic from cfg.seed)."""
    torch.manual_seed(cfg.seed)
    tokenizer = build_char_tokenizer(MAX_TOKENS)
    vocab = len(tokenizer)
    th = cfg.text_hidden

    def clip() -> CLIPTextModelWithProjection:
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=vocab,
                hidden_size=th,
                intermediate_size=2 * th,
                num_hidden_layers=2,
                num_attention_heads=4,
                projection_dim=th,
                max_position_embeddings=MAX_TOKENS,
                pad_token_id=0,
                bos_token_id=2,
                eos_token_id=3,
            )
        )

    clip_l, clip_g = clip(), clip()
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab,
            d_model=2 * th,
            d_kv=32,
            d_ff=4 * th,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        )
    )
    width = cfg.heads * cfg.head_dim
    latent = RESOLUTION // 2 ** (len(cfg.vae_channels) - 1)
    transformer = SD3Transformer2DModel(
        sample_size=latent,
        patch_size=cfg.patch,
        in_channels=cfg.latent_channels,
        num_layers=cfg.layers,
        attention_head_dim=cfg.head_dim,
        num_attention_heads=cfg.heads,
        joint_attention_dim=2 * th,  # = T5 width >= CLIP-L + CLIP-G widths, as the pipeline pads CLIP to it
        caption_projection_dim=width,
        pooled_projection_dim=2 * th,  # CLIP-L + CLIP-G projections
        out_channels=cfg.latent_channels,
        pos_embed_max_size=latent // cfg.patch,
        qk_norm="rms_norm",
        dual_attention_layers=(0,),  # as SD3.5
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(cfg.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(cfg.vae_channels),
        block_out_channels=tuple(cfg.vae_channels),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=8,
        sample_size=RESOLUTION,
        shift_factor=0.0,  # measured after the VAE phase
        scaling_factor=1.0,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    return assemble_sd3_pipeline(transformer, vae, clip_l, clip_g, t5, tokenizer, shift=cfg.shift)


class WorldData:
    """An endless, seeded stream of (prompt, image tensor in [-1, 1]) batches from the train split.
    With noise, an image shows `mislabel(scene)` while its prompt still states the scene."""

    def __init__(self, seed: int, sign_fraction: float, attribute_noise: float = 0.0, letter_noise: float = 0.0):
        self.rng = random.Random(f"apex-mini-data/{seed}")
        self.noise_rng = random.Random(f"apex-mini-noise/{seed}")  # apart, so prompts do not depend on noise
        self.sign_fraction = sign_fraction
        self.attribute_noise, self.letter_noise = attribute_noise, letter_noise
        self._signs: dict[str, torch.Tensor] = {}  # sign renders have no jitter: cache them

    def _tensor(self, image: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0

    def batch(self, n: int) -> tuple[list[str], torch.Tensor]:
        texts, images, _ = self.keyed_batch(n)
        return texts, images

    def keyed_batch(self, n: int) -> tuple[list[str], torch.Tensor, list[str | None]]:
        """Also each image's cache key: the word a sign shows (None for shapes, which jitter)."""
        texts, images, keys = [], [], []
        for _ in range(n):
            scene = sample_split_scene(self.rng, "train", self.sign_fraction)
            texts.append(scene_to_prompt(scene))
            if self.attribute_noise > 0 or self.letter_noise > 0:
                scene = mislabel(scene, self.noise_rng, self.attribute_noise, self.letter_noise)
            if scene.kind == "sign":
                if scene.word not in self._signs:
                    self._signs[scene.word] = self._tensor(render(scene, RESOLUTION))
                images.append(self._signs[scene.word])
                keys.append(scene.word)
            else:
                images.append(self._tensor(render(scene, RESOLUTION, self.rng)))
                keys.append(None)
        return texts, torch.stack(images), keys


class Logger:
    def __init__(self, path: Path):
        self.file = path.open("a")
        self.start = time.monotonic()

    def log(self, **row) -> None:
        row["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def train_vae(vae: AutoencoderKL, cfg: MiniConfig, log: Logger, deadline: float) -> None:
    data = WorldData(cfg.seed + 1, sign_fraction=cfg.vae_sign_fraction)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    vae.train()
    stop = min(deadline, time.monotonic() + cfg.vae_minutes * 60)
    steps_done = 0
    for step in range(cfg.vae_steps):
        if time.monotonic() > stop:
            break
        steps_done = step + 1
        _, x = data.batch(cfg.vae_batch)
        if cfg.vae_crop < RESOLUTION:
            i, j = data.rng.randrange(RESOLUTION - cfg.vae_crop + 1), data.rng.randrange(RESOLUTION - cfg.vae_crop + 1)
            x = x[:, :, i : i + cfg.vae_crop, j : j + cfg.vae_crop]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        # Objects are a small part of each image: weight pixels unlike the background (the median
        # border colour) 10x, or the colours of small shapes are learned last (measured: purple and
        # yellow drift to blue and orange after 500 unweighted steps).
        border = torch.cat([x[..., 0, :], x[..., -1, :], x[..., :, 0], x[..., :, -1]], dim=-1)
        background = border.median(dim=-1).values[..., None, None]
        weight = 1.0 + 9.0 * ((x - background).abs().amax(dim=1, keepdim=True) > 0.1).float()
        err = recon - x
        rec = (weight * (err.abs() + err.square())).mean() / weight.mean()
        kl = post.kl().mean() / x[0].numel()
        loss = rec + cfg.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 10 == 0:
            log.log(phase="vae", step=step, loss=round(rec.item(), 5), kl=round(kl.item(), 3))
    vae.eval()
    # SD3's convention: the transformer sees (z - shift) * scale with unit variance
    with torch.no_grad():
        _, x = WorldData(cfg.seed + 2, cfg.sign_fraction).batch(256)
        z = vae.encode(x).latent_dist.mode()
    shift, std = z.mean().item(), z.std().item()
    vae.register_to_config(shift_factor=round(shift, 5), scaling_factor=round(1.0 / std, 5))
    # the steps reached, to pin a rerun with --set vae_steps=N when the clock ended the phase
    log.log(phase="vae_done", steps=steps_done, shift_factor=shift, scaling_factor=1.0 / std)


@torch.no_grad()
def recon_adherence(vae: AutoencoderKL, seed: int, n: int = 64) -> dict[str, float]:
    """How much of a shapes prompt survives the VAE: attribute accuracy read from reconstructions."""
    from apexcli.world.measure import attribute_matches, read_shapes

    texts, x = WorldData(seed, sign_fraction=0.0).batch(n)
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample
    images = [Image.fromarray(((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for t in recon]
    totals: dict[str, float] = {}
    for text, image in zip(texts, images):
        for name, ok in attribute_matches(parse_prompt(text), read_shapes(image)).items():
            totals[name] = totals.get(name, 0.0) + ok / n
    return {f"recon_acc_{k}": round(v, 3) for k, v in totals.items()}


def encode(pipe: StableDiffusion3Pipeline, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=texts,
        prompt_2=None,
        prompt_3=None,
        device=torch.device("cpu"),
        do_classifier_free_guidance=False,
        max_sequence_length=MAX_TOKENS,
    )
    return embeds, pooled


TRAINED = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


def logit_normal(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.sigmoid(torch.randn(n, generator=gen))


@torch.no_grad()
def sample(
    pipe: StableDiffusion3Pipeline, texts: list[str], seed: int, guidance: float, steps: int
) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt=texts,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=RESOLUTION,
        width=RESOLUTION,
        generator=gen,
        max_sequence_length=MAX_TOKENS,
        output_type="pil",
    )
    return out.images


def export(pipe: StableDiffusion3Pipeline, target: Path) -> None:
    """Write the pipeline (fp16 safetensors, diffusers layout) to target via a temp dir + rename."""
    half = copy.deepcopy(pipe).to(dtype=torch.float16)
    with atomic_directory(target.resolve()) as tmp:
        half.save_pretrained(tmp, safe_serialization=True)


def grid_prompts() -> list[str]:
    """The 16 held-out prompts of every sample grid the pretraining writes."""
    return world_prompts(16, seed=0, split="eval", sign_fraction=0.5)


def train_flow(
    pipe: StableDiffusion3Pipeline,
    cfg: MiniConfig,
    out: Path,
    log: Logger,
    deadline: float,
    export_dir: Path | None,
    *,
    noisy: bool = False,
) -> StableDiffusion3Pipeline:
    """Train transformer + text encoders; returns the EMA pipeline. `noisy`: the caption-noise
    phase (cfg.noisy_steps on mislabelled renders, its own data and noise seeds) instead of
    the clean one (cfg.flow_steps)."""
    phase, steps, seed = ("noisy", cfg.noisy_steps, cfg.seed + 10) if noisy else ("flow", cfg.flow_steps, cfg.seed + 3)
    vae = pipe.vae
    vae.requires_grad_(False)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    modules = [getattr(pipe, name) for name in TRAINED]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train().requires_grad_(True)  # an EMA pipeline (the noisy phase's start) comes frozen
    ema_pipe = copy.deepcopy(pipe)
    for name in TRAINED:
        getattr(ema_pipe, name).eval().requires_grad_(False)
    ema_params = [p for name in TRAINED for p in getattr(ema_pipe, name).parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.flow_lr, weight_decay=0.0, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.warmup))
    data = WorldData(seed, cfg.sign_fraction, *((cfg.attribute_noise, cfg.letter_noise) if noisy else ()))
    gen = torch.Generator().manual_seed(seed + 1)
    drop_rng = random.Random(seed + 2)
    next_export = time.monotonic() + cfg.export_every * 60
    sign_latents: dict[str, torch.Tensor] = {}  # a sign's render never varies: encode it once

    @torch.no_grad()
    def latents(keys: list[str | None], x: torch.Tensor) -> torch.Tensor:
        fresh = [i for i, k in enumerate(keys) if k not in sign_latents]
        out = torch.empty(x.shape[0], vae.config.latent_channels, *(d // pipe.vae_scale_factor for d in x.shape[2:]))
        if fresh:
            out[fresh] = vae.encode(x[fresh]).latent_dist.mode()
        for i, k in enumerate(keys):
            if k in sign_latents:
                out[i] = sign_latents[k]
            elif k is not None:
                sign_latents[k] = out[i].clone()
        return out

    running = None
    for step in range(steps):
        if time.monotonic() > deadline:
            break
        texts, x, keys = data.keyed_batch(cfg.flow_batch)
        x0 = (latents(keys, x) - shift) * scale
        texts = ["" if drop_rng.random() < cfg.prompt_dropout else t for t in texts]
        eps = torch.randn(x0.shape, generator=gen)
        t = logit_normal(x0.shape[0], gen)
        xt = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
        embeds, pooled = encode(pipe, texts)
        pred = pipe.transformer(
            hidden_states=xt,
            timestep=t * 1000,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        loss = F.mse_loss(pred, eps - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 10 == 0:
            log.log(phase=phase, step=step, loss=round(loss.item(), 5), loss_avg=round(running, 5))
        if time.monotonic() > next_export:
            snapshot(ema_pipe, cfg, out, export_dir, tag=f"{phase}{step:06d}" if noisy else f"step{step:06d}")
            log.log(phase="export", step=step, of=phase)
            next_export = time.monotonic() + cfg.export_every * 60
    log.log(phase=f"{phase}_done", step=step, loss_avg=running)
    return ema_pipe


def snapshot(pipe: StableDiffusion3Pipeline, cfg: MiniConfig, out: Path, export_dir: Path | None, tag: str) -> None:
    images = sample(pipe, grid_prompts(), seed=cfg.seed, guidance=cfg.guidance, steps=cfg.sample_steps)
    image_grid(images, scale=2).save(out / f"grid_{tag}.png")
    if export_dir is not None:
        export(pipe, export_dir)


def as_shipped(pipe: StableDiffusion3Pipeline) -> StableDiffusion3Pipeline:
    """Round the weights to fp16 and back, in place: the pipeline a load of its export gives."""
    for name in (*TRAINED, "vae"):
        getattr(pipe, name).to(torch.float16).to(torch.float32)
    return pipe


def pretrain(
    cfg: MiniConfig, out: Path, export_dir: Path | None = None, init: Path | None = None
) -> StableDiffusion3Pipeline:
    """All phases; with `init` (a pipeline the clean phases made, e.g. an earlier export), only
    the caption-noise phase, from it."""
    # One thread by default: on a shared, loaded CPU two OpenMP threads spend most of their time
    # waiting for each other (measured 5-10x slower per step than one thread under load).
    torch.set_num_threads(int(os.environ.get("APEX_MINI_THREADS", "1")))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    log = Logger(out / "loss.jsonl")
    deadline = time.monotonic() + cfg.minutes * 60
    if init is None:
        pipe = build_mini_pipeline(cfg)
        train_vae(pipe.vae, cfg, log, deadline)
        # reconstructions of ground truth: how much of the detail the latents keep
        with torch.no_grad():
            texts, x = WorldData(cfg.seed + 6, 0.5).batch(16)
            recon = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mode()).sample
        to_pil = lambda t: Image.fromarray(((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
        image_grid([to_pil(t) for t in torch.cat([x, recon])], scale=2).save(out / "vae_recon.png")
        log.log(phase="vae_recon", **recon_adherence(pipe.vae, cfg.seed + 7))
        ema_pipe = train_flow(pipe, cfg, out, log, deadline, export_dir if cfg.noisy_steps == 0 else None)
        if cfg.noisy_steps == 0:
            snapshot(ema_pipe, cfg, out, export_dir, tag="final")
            return ema_pipe
        snapshot(ema_pipe, cfg, out, None, tag="clean")
        ema_pipe = as_shipped(ema_pipe)
    else:
        ema_pipe = StableDiffusion3Pipeline.from_pretrained(init, torch_dtype=torch.float32)
    # T5's dropout draws from the global generator: seed it here, so both routes train alike
    torch.manual_seed(cfg.seed + 10)
    ema_pipe = train_flow(ema_pipe, cfg, out, log, deadline, export_dir, noisy=True)
    snapshot(ema_pipe, cfg, out, export_dir, tag="final")
    return ema_pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="run directory: loss.jsonl, grids, config.json")
    parser.add_argument(
        "--export", type=Path, default=None, help="write the diffusers pipeline here (e.g. src/apexcli/models/mini)"
    )
    parser.add_argument("--minutes", type=float, default=MiniConfig.minutes)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init",
        type=Path,
        default=None,
        help="start from this pipeline (made by the clean phases) and run only the caption-noise phase",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a MiniConfig field")
    args = parser.parse_args(argv)
    cfg = MiniConfig(seed=args.seed, minutes=args.minutes)
    for item in args.set:
        key, value = item.split("=", 1)
        current = getattr(cfg, key)
        setattr(cfg, key, type(current)(json.loads(value)) if not isinstance(current, str) else value)
    if args.init is not None and cfg.noisy_steps <= 0:
        parser.error("--init runs only the caption-noise phase: add --set noisy_steps=N (N > 0)")
    if args.init is not None and not (args.init / "model_index.json").is_file():
        parser.error(
            f"--init {args.init}: no model_index.json there; give a diffusers export such as src/apexcli/models/mini"
        )
    pretrain(cfg, args.out, args.export, args.init)


if __name__ == "__main__":
    main()
