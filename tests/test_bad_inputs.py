"""Bad configs and data, one row each: the error names the problem (setting, value, why) AND the fix.

Every row calls the public entry point that meets the input first in a real run (``load_config``,
``ParallelDims.from_config`` with the world size, ``build_loader``, the pipeline splitter, the
Checkpointer through ``train``, the launcher, ``LONGTRAIN_FAULT``), and asserts two patterns on the
message: one for the problem, one for what to change. Nothing here needs a process group.
"""

from __future__ import annotations

import json
import re
import os

import pytest

from longtrain.config import ConfigError, load_config
from test_launch_common import TINY


def cfg(*overrides: str):
    return load_config(None, [*TINY, *overrides])


def dims(world: int, *overrides: str):
    from longtrain.parallel.mesh import ParallelDims

    return ParallelDims.from_config(cfg(*overrides), world)


def loader(data_overrides: list[str], vocab_size: int = 264):
    from longtrain.data.loader import _DOCS_CACHE, build_loader

    _DOCS_CACHE.clear()
    c = cfg(*data_overrides)
    return build_loader(c.data, vocab_size=vocab_size)


def prepared(tmp_path):
    from longtrain.data.prepare import prepare

    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(20)))
    prepare([str(tmp_path / "in.jsonl")], tmp_path / "shards", shard_mb=0.001, progress=False)
    return tmp_path / "shards"


# ------------------------------------------------------------------ rows that need files


def missing_shard(tmp_path):
    out = prepared(tmp_path)
    os.remove(sorted(out.glob("shard-*.parquet"))[1])
    loader(["data.source=shards", f"data.path={out}", "data.eval_fraction=0"])


def empty_dataset(tmp_path):
    from longtrain.data.prepare import prepare

    (tmp_path / "in.jsonl").write_text('{"text": ""}\n{"text": "   "}\n')
    prepare([str(tmp_path / "in.jsonl")], tmp_path / "shards", on_bad_document="skip", progress=False)


def shards_from_another_tokenizer(tmp_path):
    out = prepared(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["tokenizer"]["fingerprint"] = "0123456789abcdef"
    (out / "manifest.json").write_text(json.dumps(manifest))
    loader(["data.source=shards", f"data.path={out}", "data.eval_fraction=0"])


def checkpoint_from_another_model(tmp_path):
    from longtrain.trainer.train import train

    common = ["schedule.steps=1", "schedule.warmup_steps=0", f"logging.run_dir={tmp_path}"]
    train(cfg(*common))
    train(cfg(*common, "model.dim=64", "schedule.steps=2"))


def data_state_from_other_settings(tmp_path):
    state = loader(["data.source=synthetic", "data.synthetic_docs=64"]).state_dict()
    loader(["data.source=synthetic", "data.synthetic_docs=64", "data.seq_len=64"]).load_state_dict(state)


def pp_boundaries_out_of_range(tmp_path):
    from longtrain.parallel.pipeline_split import stage_boundaries

    stage_boundaries(cfg("parallel.pp=2", "parallel.pp_boundaries=[99]"), 2)


def pp_microbatches_not_dividing(tmp_path):
    from longtrain.parallel.pipeline import n_microbatches

    n_microbatches(cfg("parallel.pp=2", "parallel.pp_microbatches=3"))


def nccl_without_gpu(tmp_path):
    import torch

    from longtrain.parallel.mesh import _backend

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    _backend(cfg("parallel.backend=nccl"))


def local_launcher_on_two_nodes(tmp_path):
    from longtrain.launch.local import launch_local

    launch_local(cfg("launch.nodes=2", f"logging.run_dir={tmp_path}"), None, [])


def entry_without_function(tmp_path):
    from longtrain.launch.worker import resolve_entry

    resolve_entry("longtrain.trainer.train")


def resume_path_missing(tmp_path):
    from longtrain.trainer.checkpoint_format import resolve_checkpoint_path

    resolve_checkpoint_path(tmp_path / "checkpoints" / "step-7")


def fault_spec_malformed(tmp_path):
    from longtrain.trainer.faults import parse_faults

    parse_faults("kill@3")


def yaml_not_a_mapping(tmp_path):
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    load_config(str(tmp_path / "bad.yaml"))


# ------------------------------------------------------------------ the table

ROWS = [
    # id, how to trigger, problem pattern, fix pattern
    ("sp-not-dividing-heads", lambda t: dims(4, "parallel.sp=4"),
     r"parallel.sp=4 does not divide model.n_heads=2", r"use sp in \{1, 2\}"),
    ("seq-len-not-divisible-by-sp-x-tp", lambda t: dims(2, "parallel.sp=2", "data.seq_len=33"),
     r"data.seq_len=33 is not divisible by parallel.sp \* parallel.tp = 2 \* 1", r"Use a seq_len that is a multiple of 2"),
    ("parallel-product-not-world-size", lambda t: dims(4, "parallel.dp_shard=3"),
     r"parallel.dp_shard=3 = 3, but the world size is 4", r"Set parallel.dp_shard=-1 to fill the rest"),
    ("world-not-divisible-by-fixed-sizes", lambda t: dims(4, "parallel.pp=3"),
     r"world size 4 is not divisible by .*parallel.pp=3", r"launch a multiple of 3 processes"),
    ("tp-not-dividing-kv-heads", lambda t: dims(2, "parallel.tp=2"),
     r"parallel.tp=2 does not divide model.n_kv_heads=1", r"use tp in \{1\}"),
    ("negative-lr", lambda t: cfg("optim.lr=-0.1"), r"optim.lr=-0.1 must be > 0", r"set a positive value"),
    ("unknown-attention-backend", lambda t: cfg("model.attn_backend=flash3"),
     r"model.attn_backend='flash3' is not allowed", r"choose one of \['auto', 'sdpa'"),
    ("typo-in-key", lambda t: cfg("optim.lrr=1e-3"), r"unknown config key 'optim.lrr'", r"Did you mean 'lr'\?"),
    ("typo-in-section", lambda t: cfg("modle.dim=64"), r"unknown config key 'modle'", r"Did you mean 'model'\?"),
    ("wrong-type-int", lambda t: cfg("data.batch_size=many"), r"data.batch_size='many' must be an integer",
     r"write a whole number, e.g. data.batch_size=8"),
    ("wrong-type-bool", lambda t: cfg("model.tie_embeddings=maybe"), r"model.tie_embeddings='maybe' must be a boolean",
     r"write model.tie_embeddings=true or model.tie_embeddings=false"),
    ("section-given-a-value", lambda t: cfg("model=5"), r"model is a section", r"give it as a mapping, e.g. model.<field>=<value>"),
    ("override-without-value", lambda t: cfg("optim.lr"), r"override 'optim.lr' must look like section.key=value",
     r"e.g. optim.lr=1e-3"),
    ("loops-above-loops-max", lambda t: cfg("model.arch=looped", "model.loops=9", "model.loops_max=8"),
     r"model.loops=9 exceeds model.loops_max=8", r"raise loops_max"),
    ("dim-not-divisible-by-heads", lambda t: cfg("model.dim=30", "model.n_heads=4"),
     r"model.dim=30 is not divisible by model.n_heads=4", r"pick n_heads among the divisors of dim"),
    ("odd-head-dim", lambda t: cfg("model.dim=30", "model.n_heads=2"),
     r"model.dim/model.n_heads=30/2=15 must be even for rotary embeddings", r"so that dim / n_heads is even"),
    ("kv-heads-not-dividing-heads", lambda t: cfg("model.dim=48", "model.n_heads=6", "model.n_kv_heads=4"),
     r"model.n_heads=6 is not divisible by model.n_kv_heads=4", r"use n_kv_heads in \{1, 2, 3, 6\}"),
    ("warmup-longer-than-run", lambda t: cfg("schedule.steps=10", "schedule.warmup_steps=20"),
     r"schedule.warmup_steps=20 exceeds schedule.steps=10", r"shorten the warmup"),
    ("seq-len-above-max-seq-len", lambda t: cfg("data.seq_len=64", "model.max_seq_len=32"),
     r"data.seq_len=64 exceeds model.max_seq_len=32", r"raise model.max_seq_len or shorten data.seq_len"),
    ("beta-out-of-range", lambda t: cfg("optim.beta2=1.5"), r"optim.beta2=1.5 must be in \(0, 1\)",
     r"optim.beta1=0.9 optim.beta2=0.95"),
    ("eval-fraction-out-of-range", lambda t: cfg("data.eval_fraction=1"), r"data.eval_fraction=1.0 must be in \[0, 1\)",
     r"set e.g. 0.02, or 0"),
    ("bad-recompute-entry", lambda t: cfg("memory.recompute_layers=['0-3']"),
     r"memory.recompute_layers entry '0-3' must look like 'SELECTOR:MODE'", r"e.g. '0-7:full'"),
    ("two-optimizer-offloads", lambda t: cfg("memory.optimizer_offload=true", "memory.fsdp_cpu_offload=true"),
     r"both move the optimizer to the CPU", r"set only one"),
    ("shards-without-path", lambda t: cfg("data.source=shards"), r"data.source=shards needs data.path",
     r"point it at the prepared dataset"),
    ("config-file-not-found", lambda t: load_config("no-such-config"), r"config file 'no-such-config' not found",
     r"give a path to a YAML file or one of the shipped configs: .*tiny"),
    ("yaml-not-a-mapping", yaml_not_a_mapping, r"must hold a mapping of sections, got list", r"write one block per section, e.g. a line 'optim:'"),
    ("tokenizer-vocab-above-model-vocab", lambda t: loader(["data.source=stdlib"], vocab_size=100),
     r"data.tokenizer='byte' has \d+ tokens but model.vocab_size=100", r"Raise model.vocab_size to at least \d+"),
    ("missing-shard", missing_shard, r"shard-\d+\.parquet is listed in .*manifest.json but missing",
     r"re-run `longtrain data prepare` with the same arguments"),
    ("empty-dataset", empty_dataset, r"in.jsonl\) hold no documents to train on \(skipped: 2 empty\)",
     r"check the inputs, --format and --text-field"),
    ("shards-from-another-tokenizer", shards_from_another_tokenizer,
     r"does not match the tokenizer the shards .* were prepared with", r"Set data.tokenizer='byte', or re-prepare"),
    ("checkpoint-from-another-model", checkpoint_from_another_model,
     r"written for a different model shape: model.dim: checkpoint 32, this run 64",
     r"Resume with the checkpoint's model settings, or start fresh with checkpoint.resume=none"),
    ("data-state-from-other-settings", data_state_from_other_settings,
     r"data loader state was saved with other settings: seq_len=32 \(now 64\)", r"Restore the old data settings"),
    ("pp-boundaries-out-of-range", pp_boundaries_out_of_range,
     r"parallel.pp_boundaries=\[99\] must be 1 strictly increasing virtual-layer indices in \[1, \d+\]",
     r"Leave it empty \(null\) for automatic balancing"),
    ("pp-microbatches-not-dividing-rows", pp_microbatches_not_dividing,
     r"= 2 rows per step into parallel.pp_microbatches=3 equal micro-batches", r"choose pp_microbatches among the divisors of 2"),
    ("nccl-without-gpu", nccl_without_gpu, r"parallel.backend=nccl needs CUDA GPUs, but none is visible",
     r"use parallel.backend=gloo \(or auto\)"),
    ("local-launcher-on-two-nodes", local_launcher_on_two_nodes, r"launch.nodes=2 with launch.backend=local",
     r"use launch.backend=slurm or ray"),
    ("entry-without-function", entry_without_function, r"launch.entry='longtrain.trainer.train' must look like",
     r"e.g. longtrain.trainer.train:train"),
    ("resume-path-missing", resume_path_missing, r"checkpoint path '.*step-7' does not exist",
     r"give a step directory \(.../checkpoints/step-N\)"),
    ("fault-spec-malformed", fault_spec_malformed, r"LONGTRAIN_FAULT entry 'kill@3' must look like ACTION@step:N",
     r"e.g. LONGTRAIN_FAULT=kill@step:3"),
]


def test_the_table_has_at_least_twenty_distinct_inputs():
    assert len({r[0] for r in ROWS}) == len(ROWS) >= 20


@pytest.mark.parametrize("trigger,problem,fix", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_bad_input_error_names_the_problem_and_the_fix(tmp_path, trigger, problem, fix):
    from longtrain.trainer.checkpoint_format import CheckpointError

    with pytest.raises((ConfigError, CheckpointError)) as e:
        trigger(tmp_path)
    msg = str(e.value)
    assert re.search(problem, msg, re.S), f"problem not named:\n{msg}"
    assert re.search(fix, msg, re.S), f"no fix given:\n{msg}"


# ------------------------------------------------------------------ through the command line: one line, exit code 2
# The rows above check the message; these run `longtrain ...` (its main(), in this process) and check
# what the user sees: exactly one line on stderr, labelled with its kind, no traceback, exit code 2 --
# the code every launcher reads as "do not restart".


@pytest.fixture(scope="module")
def one_checkpoint(tmp_path_factory):
    """A run of the tiny model with committed checkpoints at steps 1 and 2."""
    from longtrain.trainer.train import train

    run = tmp_path_factory.mktemp("ckpt-run")
    train(cfg("schedule.steps=2", "schedule.warmup_steps=0", "checkpoint.every_steps=1", f"logging.run_dir={run}"))
    return run / "checkpoints"


def _damaged_copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    for step in dst.glob("step-*"):
        for shard in step.glob("*.distcp"):
            with open(shard, "r+b") as f:
                f.truncate(10)
    return dst


def _train_argv(tmp_path, *extra):
    return ["train", *TINY, "schedule.steps=3", "schedule.warmup_steps=0", f"logging.run_dir={tmp_path / 'run'}",
            *extra]


CLI_ROWS = [
    # id, argv(tmp_path, checkpoints), kind, problem pattern, fix pattern
    ("resume-names-a-damaged-checkpoint",
     lambda t, ck: _train_argv(t, f"checkpoint.resume={_damaged_copy(ck, t / 'ck') / 'step-2'}"), "checkpoint",
     r"checkpoint.resume=.*step-2 names a damaged checkpoint: .*truncated", r"set checkpoint.resume=auto"),
    ("resume-auto-with-every-checkpoint-damaged",
     lambda t, ck: _train_argv(t, f"checkpoint.dir={_damaged_copy(ck, t / 'ck')}"), "checkpoint",
     r"no usable checkpoint in .*ck: .*step-2.*truncated.*step-1.*truncated", r"set checkpoint.resume=none"),
    ("resume-into-another-model-shape",
     lambda t, ck: _train_argv(t, f"checkpoint.resume={ck}", "model.n_layers=3"), "checkpoint",
     r"different model shape: model.n_layers: checkpoint 2, this run 3", r"start fresh with checkpoint.resume=none"),
    ("resume-path-missing", lambda t, ck: _train_argv(t, f"checkpoint.resume={t / 'nowhere'}"), "checkpoint",
     r"checkpoint path '.*nowhere' does not exist", r"give a step directory"),
    ("run-dir-under-a-file",
     lambda t, ck: (t / "a-file").write_text("x") and _train_argv(t, f"logging.run_dir={t / 'a-file' / 'run'}"),
     "config", r"cannot create .*a-file/run: .*a-file is a file, not a directory", r"point logging.run_dir"),
    ("master-port-out-of-range", lambda t, ck: ["launch", *TINY, "launch.master_port=70000"], "config",
     r"launch.master_port=70000 is not a TCP port", r"use one in 1-65535, or 0 for a free one"),
    ("nprocs-suggests-nproc-per-node", lambda t, ck: ["launch", *TINY, "launch.nprocs=2"], "config",
     r"unknown config key 'launch.nprocs'", r"Did you mean 'nproc_per_node'\?"),
    ("data-error-is-labelled-data",
     lambda t, ck: _train_argv(t, "data.source=shards", f"data.path={t / 'no-shards'}"), "data",
     r"no-shards' holds no manifest.json", r"point it at a folder written by `longtrain data prepare`"),
]


@pytest.mark.parametrize("argv,kind,problem,fix", [r[1:] for r in CLI_ROWS], ids=[r[0] for r in CLI_ROWS])
def test_cli_user_error_is_one_labelled_line_with_exit_code_2(tmp_path, capsys, one_checkpoint, argv, kind,
                                                               problem, fix):
    from longtrain.cli import main
    from longtrain.errors import EXIT_CODE_USER_ERROR

    args = argv(tmp_path, one_checkpoint)
    capsys.readouterr()
    rc = main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == EXIT_CODE_USER_ERROR == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"longtrain: {kind} error: "), lines[0]
    assert re.search(problem, lines[0]) and re.search(fix, lines[0]), lines[0]
