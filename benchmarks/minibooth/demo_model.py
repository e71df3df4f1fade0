"""Build the demo's shipped model, ``dreambooth_gs/resources/minibooth/``, from MiniBooth v2's pretraining: the recipe.

    python benchmarks/minibooth/demo_model.py --num_threads 2     # pretrains what is not cached (~35 min), then writes

What it writes (a diffusers StableDiffusionPipeline folder, plus the demo's extras):
- the v2 base pipeline (UNet, CLIP text encoder, VAE, DDPM scheduler) in float16;
- its tokenizer restricted to the world's words: every byte symbol, the merges that build the tokens of the world's
  vocabulary and prompts, and the special tokens (about 600 tokens instead of 49,408), with the text encoder's
  embedding rows cut to match. The world's texts give the same ids mapped and the same encoder outputs (checked here
  before anything is written); any other word still tokenizes, into the byte symbols (which the model never learned);
- ``oracle/``: the attribute oracle (float16), which scores the demo;
- ``subject/``: the held-out subject's instance pictures (rendered by the world's renderer) and its description;
- ``manifest.json``: every file's size and SHA-256, the stages' fingerprints and this command; ``README.md``.

The files are written to a staging folder and moved into place whole. Training is not bit-reproducible across
machines: the manifest records what was shipped, so that a rebuild can be compared, not expected equal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.minibooth.pretrain import PretrainOptions, pretrain  # noqa: E402
from benchmarks.minibooth.subjects import load_subjects, write_subject_images  # noqa: E402
from benchmarks.minibooth.world import load_world  # noqa: E402
from dreambooth_gs.cli import parse_options, run_cli  # noqa: E402
from dreambooth_gs.demo.oracle import CONFIG_NAME, WEIGHTS_NAME, load_oracle  # noqa: E402

WORLD_FILE = HERE / "world_v2.json"
SUBJECTS_FILE = HERE / "subjects_v2.json"
DEFAULT_OUTPUT = ROOT / "dreambooth_gs" / "resources" / "minibooth"
PROMPT_FILES = (HERE / "prompts.txt", HERE / "sample_prompts.txt")
EXTRA_WORDS = ("a", "an", "on", "the", "of", "in", "background", "sks", "photo", ",")  # templates and the token
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")  # CLIP's pre-tokenisation, on lower-case ASCII text


@dataclass
class DemoModelOptions:
    output_dir: str = field(default=str(DEFAULT_OUTPUT), metadata={"help": "Where the shipped model goes."})
    subject: str = field(
        default="blue_circle",
        metadata={
            "help": (
                "The held-out v2 subject the demo learns (subjects_v2.json). blue_circle: the one every method learned "
                "best in MiniBooth v2 (subject fidelity 0.75-1.00; docs/benchmarks.md)."
            )
        },
    )
    smoke: bool = field(default=False, metadata={"help": "Tiny pretraining (seconds): checks the plumbing only."})
    cache_dir: str | None = field(default=None, metadata={"help": "Pretraining cache. Default: MiniBooth's."})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads. Default: torch's."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output folder."})


def world_texts(world) -> list[str]:
    """Every text the demo model should read as it was pretrained: the world's attribute words, the MiniBooth
    prompt files and the templates."""
    words = [*world.colors, *world.shapes, *world.object_patterns, *world.background_patterns, *world.sizes]
    words += [*world.positions, *EXTRA_WORDS]
    lines = [line for path in PROMPT_FILES for line in path.read_text().splitlines() if not line.startswith("#")]
    return words + [line.replace("{token}", "sks").replace("{class}", world.shapes[0]) for line in lines if line]


def bpe_steps(word: str, ranks: dict[tuple[str, str], int]) -> tuple[list[str], set[str], set[tuple[str, str]]]:
    """CLIP's byte-pair encoding of one pre-tokenised ASCII word: ``(final tokens, every symbol met, merges used)``.
    At each step the adjacent pair of lowest rank is merged everywhere, as CLIP's tokenizer does."""
    symbols = [*word[:-1], word[-1] + "</w>"]
    met, used = set(symbols), set()
    while len(symbols) > 1:
        pairs = {(a, b) for a, b in zip(symbols, symbols[1:]) if (a, b) in ranks}
        if not pairs:
            break
        best = min(pairs, key=ranks.__getitem__)
        used.add(best)
        merged, i = [], 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
        met.update(symbols)
    return symbols, met, used


def restricted_tokenizer(tokenizer_dir: Path, texts: list[str], out_dir: Path):
    """Write a CLIP tokenizer restricted to ``texts`` into ``out_dir``; returns ``(tokenizer, kept old ids)``: new id
    ``k`` is old id ``kept[k]``. Checked: every text gives the same ids, mapped."""
    from transformers import CLIPTokenizer

    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split()) for line in lines if line]
    ranks = {pair: rank for rank, pair in enumerate(merges)}
    keep = {token for token, index in vocab.items() if index < 512} | set(SPECIAL_TOKENS)  # the byte symbols
    used_merges: set[tuple[str, str]] = set()
    for text in texts:
        for word in WORD.findall(text.lower()):
            _, met, used = bpe_steps(word, ranks)
            keep |= met
            used_merges |= used
    kept = sorted(vocab[token] for token in keep)
    inverse = {index: token for token, index in vocab.items()}
    new_vocab = {inverse[old]: new for new, old in enumerate(kept)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(new_vocab, ensure_ascii=False), encoding="utf-8")
    kept_merges = [" ".join(pair) for pair in merges if pair in used_merges]
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(kept_merges) + "\n", encoding="utf-8")
    original = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    restricted = CLIPTokenizer.from_pretrained(str(out_dir), model_max_length=original.model_max_length)
    old_to_new = {old: new for new, old in enumerate(kept)}
    for text in texts:
        before = original(text, padding="max_length", truncation=True).input_ids
        after = restricted(text, padding="max_length", truncation=True).input_ids
        if [old_to_new.get(i) for i in before] != after:
            raise RuntimeError(f"the restricted tokenizer reads {text!r} differently: {before} vs {after}")
    return restricted, kept


def restricted_text_encoder(encoder, kept: list[int], tokenizer):
    """``encoder`` with its embedding table cut to the rows ``kept`` (in place) and its special ids renumbered."""
    table = encoder.get_input_embeddings()
    rows = table.weight.data[torch.tensor(kept)].clone()  # (len(kept), hidden)
    new_table = torch.nn.Embedding(len(kept), rows.shape[1])
    new_table.weight.data.copy_(rows)
    encoder.set_input_embeddings(new_table)
    encoder.config.vocab_size = len(kept)
    special = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    encoder.config.bos_token_id, encoder.config.eos_token_id = special
    encoder.config.pad_token_id = tokenizer.pad_token_id
    encoder.eos_token_id = special[1]  # where the pooled output is read (transformers 5: no text_model level)
    return encoder


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(options: DemoModelOptions, log=print) -> Path:
    from diffusers import StableDiffusionPipeline

    output = Path(options.output_dir)
    if output.exists() and not options.overwrite:
        raise ValueError(f"{output} exists; pass --overwrite to replace it")
    world = load_world(WORLD_FILE)
    subjects, instance_count = load_subjects(SUBJECTS_FILE, world)
    subject = next((s for s in subjects if s.name == options.subject), None)
    if subject is None or subject.sweep:
        names = ", ".join(s.name for s in subjects if not s.sweep)
        raise ValueError(f"--subject must be one of the reported v2 subjects ({names}), got {options.subject!r}")
    pretrained = pretrain(
        PretrainOptions(
            world_file=str(WORLD_FILE),
            stages=["vae", "denoiser", "oracle"],
            smoke=options.smoke,
            cache_dir=options.cache_dir,
            num_threads=options.num_threads,
        ),
        log=log,
    )
    pipeline = StableDiffusionPipeline.from_pretrained(
        pretrained.pipeline_dir, safety_checker=None, requires_safety_checker=False
    )
    texts = world_texts(world) + [f"a sks {subject.class_name}"]
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-model-", dir=output.parent))
    try:
        tokenizer, kept = restricted_tokenizer(pretrained.pipeline_dir / "tokenizer", texts, staging / "tokenizer")
        reference = {text: _encode(pipeline, text) for text in texts}
        pipeline.tokenizer = tokenizer
        pipeline.text_encoder = restricted_text_encoder(pipeline.text_encoder, kept, tokenizer)
        for text in texts:
            if not torch.equal(_encode(pipeline, text), reference[text]):
                raise RuntimeError(f"the restricted text encoder reads {text!r} differently")
        log(f"tokenizer: {len(kept)} of 49408 tokens kept; the world's {len(texts)} texts read identically")
        pipeline.to(torch.float16).save_pretrained(staging)
        shutil.rmtree(staging / "tokenizer")
        tokenizer.save_pretrained(staging / "tokenizer")
        (staging / "oracle").mkdir()
        oracle = load_oracle(pretrained.oracle_dir).half()
        shutil.copy2(pretrained.oracle_dir / CONFIG_NAME, staging / "oracle" / CONFIG_NAME)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in oracle.state_dict().items()}, str(staging / "oracle" / WEIGHTS_NAME))
        subject_dir = write_subject_images(subject, world, staging / "subject", instance_count)
        description = {"name": subject.name, "class_name": subject.class_name, "shape": subject.shape}
        description |= {"color": subject.color, "pattern": subject.pattern}
        (subject_dir / "subject.json").write_text(json.dumps(description, indent=2) + "\n")
        _write_manifest(staging, options, pretrained, len(kept))
        for path in [staging, *staging.rglob("*")]:  # package data: readable by all (mkdtemp and some writers: 0600)
            path.chmod(0o755 if path.is_dir() else 0o644)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in output.rglob("*") if p.is_file())
    log(f"wrote {output} ({size / 2**20:.1f} MiB)")
    return output


@torch.no_grad()
def _encode(pipeline, text: str) -> torch.Tensor:
    ids = pipeline.tokenizer(text, padding="max_length", truncation=True, return_tensors="pt").input_ids
    out = pipeline.text_encoder(ids)
    return torch.cat([out[0].flatten(), out[1].flatten()])  # every token's state and the pooled output


def _write_manifest(folder: Path, options: DemoModelOptions, pretrained, tokens: int) -> None:
    """``manifest.json`` (every file's size and SHA-256, the stages' fingerprints and build times, the recipe) and
    ``README.md`` (the same in words)."""
    stages = {
        name: {"fingerprint": marker["fingerprint"], "seconds": marker.get("seconds")}
        for name, marker in pretrained.markers.items()
    }
    recipe = f"python benchmarks/minibooth/demo_model.py --subject {options.subject}" + (
        " --smoke" if options.smoke else ""
    )
    files = {
        str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    total = sum(entry["bytes"] for entry in files.values())
    manifest = {
        "recipe": recipe,
        "world": "benchmarks/minibooth/world_v2.json",
        "stages": stages,
        "subject": options.subject,
        "tokenizer_tokens": tokens,
        "dtype": "float16",
        "torch": torch.__version__,
        "bytes": total,
        "files": files,
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    readme = README.format(recipe=recipe, size=total / 2**20, tokens=tokens, subject=options.subject)
    (folder / "README.md").write_text(readme)


README = """# The demo's world model (MiniBooth v2), shipped with dreambooth-gs

A small Stable-Diffusion-shaped pipeline (UNet, CLIP text encoder, VAE) that this project pretrained on its own
procedural world (benchmarks/minibooth: coloured, patterned shapes on backgrounds, 64 x 64 pixels), never on
downloaded data, with the attribute oracle that judges its pictures and the pictures of one held-out subject
({subject}) that the base model has never drawn. `make demo` teaches it that subject (docs/demo.md).

- Made by: `{recipe}` (cached MiniBooth v2 stages: VAE, UNet + text encoder, oracle; see docs/minibooth.md).
- Size: {size:.1f} MiB in float16. The tokenizer keeps {tokens} of CLIP's 49,408 tokens (every byte symbol, the
  merges the world's words and prompts use, the special tokens) and the text encoder the matching embedding rows:
  the world's texts read exactly as before the cut (checked when it was built). Other words still tokenize, into
  byte symbols this model never learned.
- Fingerprint: `manifest.json` lists every file's size and SHA-256 and the pretraining stages' fingerprints;
  `tests/test_demo.py` checks the files against it. Training is not bit-reproducible across machines: a rebuild is
  comparable, not equal.
- License: Apache-2.0, as dreambooth-gs. The tokenizer's vocabulary and merges are a subset of OpenAI CLIP's BPE
  vocabulary (MIT).
"""


def parse_args(input_args: list[str] | None = None) -> DemoModelOptions:
    return parse_options(DemoModelOptions, input_args, "demo_model.py", __doc__)


def main(options: DemoModelOptions) -> Path:
    return build(options, log=lambda message: print(f"[demo-model] {message}", flush=True))


if __name__ == "__main__":
    run_cli(main, parse_args(), "demo_model.py")
