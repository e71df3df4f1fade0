"""The command lines generated from the options dataclasses: one flag per field, switches as switches, defaults in
--help, diffusers' flag names, and one-line errors (unknown flags name the nearest known one)."""

from __future__ import annotations

import errno
import re
import sys
from pathlib import Path

import pytest
from safetensors import SafetensorError

from dreambooth_gs.fileio import WriteFailure

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import evaluate_clip  # noqa: E402
import train_dreambooth_gsoft  # noqa: E402

SCRIPTS = {"train": train_dreambooth_gsoft, "eval": evaluate_clip}
EVAL_REQUIRED = ["--runs", "out/a"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_once_with_defaults(script, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = re.findall(r"^  (--\w+)", text, flags=re.MULTILINE)
    assert len(flags) == len(set(flags)) > 10
    assert not re.search(r"--\w+-\w+", text.replace("--help", ""))  # no dashed duplicates of every flag
    assert "usage:" in text and len(text.split("options:")[0].splitlines()) < 30  # no 50-line usage block
    if script == "train":
        assert re.search(r"--with_prior_preservation\s+Add", text)  # a switch: no value placeholder
        assert re.search(r"--rank INT, --lora_rank INT", text)
        assert "(default: 4)" in text and "(default: gsoft)" in text


DIFFUSERS_FLAGS = [  # (flags, option, value): diffusers' train_dreambooth(_lora).py names parse with their meaning
    (["--rank", "8"], "rank", 8),
    (["--lora_rank", "8"], "rank", 8),
    (["--scale_lr"], "scale_lr", True),
    (["--snr_gamma", "5.0"], "snr_gamma", 5.0),
    (["--noise_offset", "0.1"], "noise_offset", 0.1),
    (["--use_8bit_adam"], "use_8bit_adam", True),
    (["--push_to_hub", "--hub_model_id", "me/dog"], "hub_model_id", "me/dog"),
    (["--hub_token", "abc"], "hub_token", "abc"),
    (["--pre_compute_text_embeddings"], "pre_compute_text_embeddings", True),
    (["--tokenizer_max_length", "32"], "tokenizer_max_length", 32),
    (["--text_encoder_use_attention_mask"], "text_encoder_use_attention_mask", True),
    (["--resume_from_checkpoint", "checkpoint-4"], "resume_from_checkpoint", "checkpoint-4"),
    (["--target_modules", "to_q", "to_v"], "target_modules", ["to_q", "to_v"]),
    (["--validation_prompt="], "validation_prompt", ""),
]


@pytest.mark.parametrize("flags, option, value", DIFFUSERS_FLAGS, ids=[c[0][0] for c in DIFFUSERS_FLAGS])
def test_diffusers_flag_names_parse(flags, option, value):
    options = train_dreambooth_gsoft.parse_args(flags)
    assert getattr(options, option) == value


BAD = [
    ("train", ["--rnak", "8"], "unknown flag --rnak; did you mean --rank?"),
    ("train", ["--learning-rate", "1e-4"], "unknown flag --learning-rate; did you mean --learning_rate?"),
    ("train", ["--zzzz"], "unknown flag --zzzz (see"),
    ("train", ["--center_crop", "True"], "unexpected argument 'True'"),
    ("train", ["--lr", "1e-4"], "unknown flag --lr"),  # no prefix matching: abbreviations are not flags
    ("train", ["--adapter", "dora"], "invalid choice: 'dora'"),
    ("train", ["--snr_gamma", "-1"], "--snr_gamma must be positive"),
    ("train", ["--hub_model_id", "me/dog"], "only used with --push_to_hub"),
    ("eval", [*EVAL_REQUIRED, "--image_per_prompt", "2"], "did you mean --images_per_prompt?"),
    ("eval", [], "the following arguments are required: --runs"),
]


@pytest.mark.parametrize("script, flags, message", BAD, ids=[" ".join(c[1][:1]) or "none" for c in BAD])
def test_bad_flags_are_one_line_without_usage(capsys, script, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[script].parse_args(flags)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "usage:" not in err
    assert len(err.strip().splitlines()) == 1, err


def test_help_text_may_contain_a_percent_sign(capsys):
    """argparse formats help with %, so a literal "10%" in a field's help must not break --help."""
    from dataclasses import dataclass, field

    from dreambooth_gs.cli import options_parser

    @dataclass
    class Options:
        warmup: int = field(default=3, metadata={"help": "Warm-up, then cosine to 10% of the rate."})

    with pytest.raises(SystemExit) as exit_info:
        options_parser(Options, "prog", None).parse_args(["--help"])
    assert exit_info.value.code == 0
    assert "cosine to 10% of the rate. (default: 3)" in capsys.readouterr().out


# (id, what main raises, the one line on stderr after "prog: error: "; None: not a user error, it propagates)
RUN_CLI_CASES = [
    ("user-error", lambda: ValueError("--rank must be positive"), "--rank must be positive"),
    ("write-failure", lambda: WriteFailure("writing out/x failed: the disk is full (...); out/x is unchanged"),
     "writing out/x failed: the disk is full (...); out/x is unchanged"),
    ("erofs", lambda: OSError(errno.EROFS, "Read-only file system"),
     "cannot write: the file system is read-only ([Errno 30] Read-only file system)"),
    ("safetensors-enospc", lambda: SafetensorError("Error while serializing: I/O error: No space left on device (os "
                                                   "error 28)\nsecond line"),
     "cannot write: the disk is full (Error while serializing: I/O error: No space left on device (os error 28))"),
    ("torch-writer", lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
     "cannot write: a write failed (the disk is probably full) ([enforce fail at inline_container.cc:672] . "
     "unexpected pos 64 vs 0)"),
    ("bug", lambda: RuntimeError("shapes do not match"), None),
    ("eio", lambda: OSError(errno.EIO, "Input/output error"), None),
]  # fmt: skip


@pytest.mark.parametrize(("make_error", "line"), [c[1:] for c in RUN_CLI_CASES], ids=[c[0] for c in RUN_CLI_CASES])
def test_run_cli_turns_user_errors_and_failed_writes_into_one_line(capsys, make_error, line):
    from dreambooth_gs.cli import run_cli

    def main(args):
        raise make_error()

    if line is None:
        with pytest.raises(type(make_error())):
            run_cli(main, None, "prog")
        assert capsys.readouterr().err == ""
        return
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, None, "prog")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"prog: error: {line}\n"
