"""The stages of MiniBooth's pretraining (``pretrain.py``): what each depends on, and how each is built into its
cache folder (VAE, Stable Diffusion pipeline, CLIP), plus the base model's sample grid and prompt-fidelity check.

Every function takes the resolved ``PretrainOptions`` and its other inputs as arguments.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import architectures as arch
from .cache import file_digest, fingerprint
from .world import World, caption, extended_file, render_world

# Bump when a code change alters what pretraining produces, so that cached stages are rebuilt.
FORMAT = 1
HELD_OUT_CHECK = 256  # world items after the training set: reconstruction, retrieval and fidelity checks
ORACLE_CHECK = 1024  # fresh renders (another seed) on which the oracle's accuracy is measured


def stage_settings(options, world: World) -> dict[str, dict]:
    """What each stage depends on (hashed into its folder name): the VAE, the denoiser stage of ``--family`` ("sd"
    or "sd3", which depends on the VAE stage's hash), the CLIP and the oracle."""
    common = {"format": FORMAT, "world_file": file_digest(options.world_file), "seed": options.seed}
    base = extended_file(options.world_file)
    if base is not None:  # the world file's own digest does not cover the file it extends
        common["extends"] = file_digest(base)
    if world.held_out:  # the pairs come from another file (held_out_subjects)
        common["held_out"] = sorted(world.held_out)
    oracle = common | {"resolution": options.resolution}
    keys = ("oracle_images", "oracle_steps", "oracle_batch_size", "oracle_lr", "oracle_width")
    oracle |= {k: getattr(options, k) for k in keys}
    world = common | {"resolution": options.resolution, "num_images": options.num_images}
    vae = world | {"config": arch.read_config(options.config_dir, "vae")}
    vae |= {k: getattr(options, k) for k in ("vae_steps", "vae_batch_size", "vae_crop", "vae_lr", "vae_kl_weight")}
    keys = ("unet_steps", "unet_batch_size", "unet_lr", "unet_warmup_steps", "ema_decay", "caption_dropout")
    if options.family == "sd":
        parts = ("unet", "text_encoder", "scheduler")
        keys += ("min_snr_gamma",)
    else:
        parts = arch.SD3_PARTS
    denoiser = {"vae": fingerprint(vae)} | {n: arch.read_config(options.config_dir, n) for n in parts}
    denoiser |= {k: getattr(options, k) for k in keys}
    clip = world | {"config": arch.read_config(options.config_dir, "clip")}
    keys = ("clip_steps", "clip_batch_size", "clip_lr", "clip_warmup_steps", "clip_caption_keep_scale")
    clip |= {k: getattr(options, k) for k in keys}
    return {"vae": vae, options.family: denoiser, "clip": clip, "oracle": oracle}


class WorldData:
    """The world's training pictures and a held-out slice after them, rendered on first use (once per process)."""

    def __init__(self, options, world, log):
        self.options, self.world, self.log = options, world, log
        self._cache: dict[tuple[int, int], tuple] = {}

    def items(self, start: int, count: int):
        if (start, count) not in self._cache:
            self.log(f"rendering {count} world pictures")
            options = self.options
            self._cache[start, count] = render_world(count, options.seed, self.world, options.resolution, start)
        return self._cache[start, count]

    def train(self):
        return self.items(0, self.options.num_images)

    def held_out(self):
        return self.items(self.options.num_images, HELD_OUT_CHECK)


def build_vae(staging: Path, options, data: WorldData, log) -> dict:
    from .pretraining import encode_latents, to_pixels, train_vae

    vae = arch.make_vae(options.config_dir, options.seed)
    images, _ = data.train()
    losses = train_vae(
        vae,
        images,
        steps=options.vae_steps,
        batch_size=options.vae_batch_size,
        crop=options.vae_crop,
        lr=options.vae_lr,
        kl_weight=options.vae_kl_weight,
        seed=options.seed,
        log=log,
        log_every=options.log_every,
    )
    held_out, _ = data.held_out()
    mean, _ = encode_latents(vae, held_out)
    with torch.no_grad():
        error = float(torch.nn.functional.mse_loss(vae.decode(mean).sample.clamp(-1, 1), to_pixels(held_out)))
    vae.save_pretrained(staging, safe_serialization=True)
    log(f"vae: held-out reconstruction MSE {error:.4f} (pixels in [-1, 1])")
    return {"final_loss": sum(losses[-50:]) / len(losses[-50:]), "held_out_mse": error}


def build_sd(staging: Path, options, vae_dir: Path, data: WorldData, log) -> dict:
    from .pretraining import latent_scaling_factor, make_pipeline, train_denoiser

    vae, mean, std = encoded_world(vae_dir, data, log)
    _, scenes = data.train()
    scaling = latent_scaling_factor(mean, std, options.seed)
    vae.register_to_config(scaling_factor=scaling)
    text_config = arch.read_config(options.config_dir, "text_encoder")
    tokenizer = arch.make_tokenizer(staging / "tokenizer", text_config["max_position_embeddings"])
    unet = arch.make_unet(options.config_dir, options.seed + 1)
    text_encoder = arch.make_text_encoder(options.config_dir, options.seed + 2)
    scheduler = arch.make_scheduler(options.config_dir)
    losses = train_denoiser(
        unet,
        text_encoder,
        tokenizer,
        scheduler,
        latent_mean=mean,
        latent_std=std,
        scaling_factor=scaling,
        scenes=scenes,
        world=data.world,
        steps=options.unet_steps,
        batch_size=options.unet_batch_size,
        lr=options.unet_lr,
        warmup_steps=options.unet_warmup_steps,
        ema_decay=options.ema_decay,
        caption_dropout=options.caption_dropout,
        min_snr_gamma=options.min_snr_gamma,
        seed=options.seed,
        log=log,
        log_every=options.log_every,
    )
    make_pipeline(vae, text_encoder, tokenizer, unet, scheduler).save_pretrained(staging, safe_serialization=True)
    models = {"unet": unet, "text_encoder": text_encoder}
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    return {"final_loss": sum(losses[-50:]) / len(losses[-50:]), "scaling_factor": scaling, "parameters": parameters}


def encoded_world(vae_dir: Path, data: WorldData, log):
    """``(vae, mean, std)``: the trained VAE and the posterior of every training picture, each (N, C, h, w)."""
    from diffusers import AutoencoderKL

    from .pretraining import encode_latents

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    images, _ = data.train()
    log(f"encoding {len(images)} pictures with the VAE")
    return (vae, *encode_latents(vae, images))


def build_sd3(staging: Path, options, vae_dir: Path, data: WorldData, log) -> dict:
    """The flow profile's base model: SD3's transformer and two CLIP encoders trained together with flow matching
    on the VAE's latents, saved as a StableDiffusion3Pipeline folder without T5."""
    from .pretraining import LatentBatches, latent_shift_and_scale, make_sd3_pipeline, train_flow_denoiser

    vae, mean, std = encoded_world(vae_dir, data, log)
    shift, scaling = latent_shift_and_scale(mean, std, options.seed)
    vae.register_to_config(shift_factor=shift, scaling_factor=scaling)
    text_config = arch.read_config(options.config_dir, "sd3/text_encoder")
    tokenizer = arch.make_tokenizer(staging / "tokenizer", text_config["max_position_embeddings"])
    transformer = arch.make_model(options.config_dir, "sd3/transformer", options.seed + 1)
    encoders = [arch.make_model(options.config_dir, f"sd3/{n}", options.seed + k) for k, n in
                ((2, "text_encoder"), (4, "text_encoder_2"))]  # fmt: skip
    scheduler = arch.make_model(options.config_dir, "sd3/scheduler", 0)
    _, scenes = data.train()
    batches = LatentBatches(mean, std, shift, scaling, scenes, data.world, options.caption_dropout, options.seed)
    losses = train_flow_denoiser(
        transformer,
        encoders,
        [tokenizer, tokenizer],
        scheduler,
        batches,
        steps=options.unet_steps,
        batch_size=options.unet_batch_size,
        lr=options.unet_lr,
        warmup_steps=options.unet_warmup_steps,
        ema_decay=options.ema_decay,
        log=log,
        log_every=options.log_every,
    )
    make_sd3_pipeline(vae, encoders, tokenizer, transformer, scheduler).save_pretrained(
        staging, safe_serialization=True
    )
    models = {"transformer": transformer, "text_encoder": encoders[0], "text_encoder_2": encoders[1]}
    parameters = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    result = {"final_loss": sum(losses[-50:]) / len(losses[-50:]), "shift_factor": shift, "scaling_factor": scaling}
    return result | {"parameters": parameters}


def build_clip(staging: Path, options, data: WorldData, log) -> dict:
    import open_clip

    from .clip_training import load_clip, retrieval_accuracy, save_clip, train_clip

    model, model_cfg = arch.make_clip(options.config_dir, options.seed + 3)
    tokenizer = open_clip.SimpleTokenizer(context_length=model_cfg["text_cfg"]["context_length"])
    images, scenes = data.train()
    losses = train_clip(
        model,
        tokenizer,
        images,
        scenes,
        data.world,
        steps=options.clip_steps,
        batch_size=options.clip_batch_size,
        lr=options.clip_lr,
        warmup_steps=options.clip_warmup_steps,
        caption_keep_scale=options.clip_caption_keep_scale,
        seed=options.seed,
        log=log,
        log_every=options.log_every,
    )
    save_clip(model, model_cfg, staging)
    loaded, _, loaded_tokenizer = load_clip(staging)  # check the saved folder through open_clip's own loader
    held_out, held_out_scenes = data.held_out()
    accuracy = retrieval_accuracy(loaded, loaded_tokenizer, held_out[:64], [caption(s) for s in held_out_scenes[:64]])
    log(f"clip: held-out retrieval accuracy {accuracy:.2f} (picture -> its caption among 64)")
    return {
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "retrieval_accuracy_64": accuracy,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def build_oracle(staging: Path, options, world: World, log) -> dict:
    """Train the attribute oracle on world renders (held-out pairs included) and measure it on fresh renders of
    another seed, overall and on the held-out pairs alone."""
    from dreambooth_gs.demo.oracle import predict

    from .oracle import SEED_OFFSET, accuracy, judged_world, save_oracle, scene_truth, train_oracle

    oracle, losses = train_oracle(
        world,
        num_images=options.oracle_images,
        steps=options.oracle_steps,
        batch_size=options.oracle_batch_size,
        lr=options.oracle_lr,
        seed=options.seed,
        resolution=options.resolution,
        width=options.oracle_width,
        log=log,
        log_every=options.log_every,
    )
    save_oracle(oracle, staging, options.resolution)
    count = min(ORACLE_CHECK, options.oracle_images)
    images, scenes = render_world(count, options.seed + 2 * SEED_OFFSET, judged_world(world), options.resolution)
    readings, truth = predict(oracle, images), scene_truth(scenes)
    result = {"final_loss": sum(losses[-50:]) / len(losses[-50:]), "check_pictures": count}
    result["check_accuracy"] = accuracy(readings, truth)
    held = [k for k, scene in enumerate(scenes) if (scene.shape, scene.color) in world.held_out]
    if held:
        result["held_out_pictures"] = len(held)
        result["held_out_accuracy"] = accuracy([readings[k] for k in held], [truth[k] for k in held])
    log("oracle: accuracy on fresh renders " + ", ".join(f"{k} {v:.3f}" for k, v in result["check_accuracy"].items()))
    return result


def write_samples(options, pipeline_dir: Path, path: Path, log) -> None:
    from .pretraining import sample_grid

    lines = Path(options.sample_prompts).read_text().splitlines()
    prompts = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    grid = sample_grid(pipeline_dir, prompts, range(options.sample_seeds), options.sample_steps, options.guidance_scale)
    grid.save(path)
    log(f"samples: {path}")


def write_fidelity(options, dirs: dict[str, Path], data: WorldData, log) -> dict:
    """``prompt_fidelity.json`` beside the pipeline: attribute accuracy of the base model's pictures of held-out
    scenes under the MiniBooth CLIP, with the real pictures' accuracy (ceiling) and chance."""
    from .fidelity import prompt_fidelity

    path = dirs[options.family] / "prompt_fidelity.json"
    judges = {"clip_stage": dirs["clip"].name, "oracle_stage": dirs["oracle"].name}
    judges["pictures"] = options.fidelity_pictures
    if path.is_file():
        found = json.loads(path.read_text())
        if all(found.get(key) == value for key, value in judges.items()):
            return found
    real, scenes = data.held_out()
    count = options.fidelity_pictures
    result = prompt_fidelity(
        dirs[options.family],
        dirs["clip"],
        dirs["oracle"],
        scenes[:count],
        real[:count],
        data.world,
        options.sample_steps,
        options.guidance_scale,
    )
    result |= judges
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)
    for judge in ("clip", "oracle"):
        for attribute, value in result[judge]["generated"].items():
            log(
                f"prompt fidelity ({judge}) {attribute}: {value:.2f} (real pictures "
                f"{result[judge]['real'][attribute]:.2f}, chance {result['chance'][attribute]:.2f})"
            )
    return result
