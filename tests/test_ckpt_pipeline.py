"""Pipeline checkpoints, through ``train()`` and the ``Checkpointer`` (gloo, one stage per rank).

- Resume: with parallel.pp=2 a run that crashes after its step-3 checkpoint and is started again
  logs bitwise the same losses for the next five steps as a run never interrupted.
- Reshard: checkpoints name tensors as the whole model does (no ``parts.<i>.`` stage prefix,
  optimizer state keyed per parameter), so a pp=2 checkpoint loads into one process and into
  dp_shard=2, and a one-process checkpoint loads into pp=2. In each, every weight and optimizer
  tensor the run holds equals the checkpoint's bitwise, the union over ranks is the whole
  checkpoint, and the loss on a fixed batch -- as loaded, and after one more optimizer step
  (which reads the loaded moments, step counts and hyper-parameters) -- agrees with the
  checkpoint's own layout within 1e-6 relative.

Both for a Llama and for a looped transformer (4 iterations of a 2-block core with per-loop LoRA,
tied embeddings) whose shared core and tied embedding sit on both stages, so both ranks write
them under one name. For the looped model also: two stages per rank (each rank holds two copies
of the core: loading fills both, saving writes one), and pp=2 x dp_shard=2 (the shared weights
are FSDP DTensors in both pipeline groups) into one process. The expensive parts (training runs,
spawns) happen once per model in a module fixture; the tests check its results. ~55 s on 2 CPUs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from dist_utils import run_distributed

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
STEPS, CRASH_AFTER, EVERY = 8, 5, 3
RTOL = 1e-6
COMMON = ["model.vocab_size=264", "model.dim=32", "model.n_heads=2", "model.n_kv_heads=1", "model.ffn_dim=64",
          "model.max_seq_len=64"]
MODELS = {
    "llama": COMMON + ["model.arch=llama", "model.n_layers=4"],
    # 6 virtual layers (prelude.0, core@0..3, coda.0): balanced over 2 stages the core runs on both
    "looped": COMMON + ["model.arch=looped", "model.n_prelude=1", "model.n_core=2", "model.n_coda=1",
                        "model.loops=4", "model.loops_max=4", "model.loop_sampling=fixed", "model.lora_rank=2",
                        "model.reinject=concat", "model.tie_embeddings=true"],
}
# the whole model's optimizer keys a tied weight by its first name
TIED = {"head.output.weight": "tok_embeddings.weight"}


def overrides(model: list[str], run_dir: Path, parallel: dict, steps: int = STEPS) -> list[str]:
    return model + ["data.seq_len=32", "data.batch_size=2", "data.stdlib_mb=1", f"schedule.steps={steps}",
                    "schedule.warmup_steps=2", "schedule.eval_every=0", "schedule.device=cpu", "logging.log_every=1",
                    "logging.progress=false", "logging.tensorboard=false", f"logging.run_dir={run_dir}",
                    f"checkpoint.every_steps={EVERY}", "checkpoint.keep_last=10", "parallel.backend=gloo",
                    "parallel.param_dtype=fp32"] + [f"parallel.{k}={v}" for k, v in parallel.items()]


PP2 = {"pp": 2, "pp_microbatches": 2, "dp_shard": 1}
# two stages per rank: the looped model's core is on all four, so each rank holds two copies of it
INTERLEAVED = {**PP2, "pp_schedule": "interleaved_1f1b", "pp_virtual_stages": 2}
PP_DP = {**PP2, "dp_shard": 2}  # FSDP2 inside each stage: shared weights are DTensors on both pp groups


class Crash(RuntimeError):
    pass


def train_run(model: list[str], run_dir: Path, parallel: dict, crash_after: int | None = None,
              steps: int = STEPS) -> None:
    """One ``train()``; with ``crash_after`` it dies after that step (its earlier save committed)."""
    from longtrain.config import load_config
    from longtrain.trainer import checkpoint
    from longtrain.trainer.train import train

    orig = checkpoint.Checkpointer.after_step

    def after_step(self):
        orig(self)
        if crash_after is not None and self.step == crash_after:
            self.wait()
            raise Crash()

    checkpoint.Checkpointer.after_step = after_step
    try:
        train(load_config(None, overrides(model, run_dir, parallel, steps)))
    except Crash:
        pass
    finally:
        checkpoint.Checkpointer.after_step = orig


def fixed_batch() -> dict:
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, 264, (4, 32), generator=g)
    return {"tokens": tokens, "labels": tokens.roll(-1, 1), "position_ids": torch.arange(32).expand(4, 32)}


def loss_on(model, dims, cfg, batch: dict) -> float:
    from longtrain.parallel.reduce import all_reduce_sum
    from longtrain.trainer.step import model_kwargs

    with torch.no_grad():
        if dims.pp > 1:
            total = model.loss_sum(batch)  # summed over the pipeline already
        else:
            total = model(**model_kwargs(batch, dims.device), labels=batch["labels"]).double()
    return float(all_reduce_sum(total.double(), dims)) / batch["labels"].numel() / dims.dp_size


def held_tensors(model, optimizer, tied: bool) -> dict[str, torch.Tensor]:
    """Every full tensor this rank holds, under the checkpoint's key (``model.<fqn>``,
    ``optimizer.state.<fqn>.exp_avg``). Renamed here independently of the checkpoint code."""
    import re

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                          flatten_optimizer_state_dict=True))

    def whole(name: str, optim: bool) -> str:
        name = re.sub(r"^parts\.\d+\.", "", name)
        for alias, first in TIED.items() if optim and tied else ():
            if name.startswith(alias + "."):
                name = first + name[len(alias):]
        return name

    out: dict[str, torch.Tensor] = {}

    def put(key: str, v) -> None:
        if isinstance(v, torch.Tensor):  # copies of one weight on this rank must all be equal
            assert key not in out or torch.equal(out[key], v), f"two copies of {key} differ"
            out[key] = v.detach().clone()

    for k, v in msd.items():
        put(f"model.{whole(k, False)}", v)
    for k, v in osd.items():
        section, _, rest = k.partition(".")
        put(f"optimizer.{section}.{whole(rest, True)}", v)
    return out


def load_report(model: list[str], ckpt: str, parallel: dict, work: str, save: bool = False) -> bytes:
    """Load ``ckpt`` into the layout ``parallel`` (built as ``train`` builds it), then report the
    tensors held, the fixed batch's loss, and that loss after one more optimizer step. With
    ``save``, also save after that step (to ``<work>/saved``) and report the tensors then held."""
    from longtrain.config import load_config
    from longtrain.parallel.reduce import clip_grad_norm_
    from longtrain.trainer.checkpoint import Checkpointer
    from longtrain.trainer.step import forward_backward
    from longtrain.trainer.train import TrainState, setup

    cfg = load_config(None, overrides(model, Path(work), parallel)
                      + [f"checkpoint.resume={ckpt}", f"checkpoint.dir={work}/saved"])
    cfg, dims, net, opt, sched, loader, _ = setup(cfg)
    state = TrainState()
    ck = Checkpointer(cfg, dims, work, model=net, optimizer=opt, scheduler=sched, loader=loader, state=state)
    assert ck.maybe_resume() == Path(ckpt)
    tensors = held_tensors(net, opt, cfg.model.tie_embeddings)
    full = fixed_batch()
    rows = 4 // dims.dp_size
    batch = {k: v[dims.dp_rank * rows:(dims.dp_rank + 1) * rows] for k, v in full.items()}
    before = loss_on(net, dims, cfg, batch)
    n_loops = cfg.model.loops if cfg.model.arch == "looped" else None
    forward_backward(net, [batch], dims, cfg, n_loops)
    clip_grad_norm_(net.parameters(), cfg.optim.grad_clip, dims)
    opt.step()
    opt.zero_grad(set_to_none=True)
    sched.step()
    after = loss_on(net, dims, cfg, batch)
    out = {"tensors": tensors, "before": before, "after": after, "step": state.step}
    if save:
        state.step += 1
        ck.save(sync=True)
        out["saved_tensors"] = held_tensors(net, opt, cfg.model.tie_embeddings)
    ck.finish()
    buf = io.BytesIO()  # bytes: tensors through a multiprocessing queue share memory with the sender
    torch.save(out, buf)
    return buf.getvalue()


def pipeline_side(model: list[str], root: str, pp1_ckpt: str) -> dict:
    """On 2 ranks: the uninterrupted, crashed and resumed pp=2 runs, then loading the pp=2 and the
    one-process checkpoint into pp=2 (and, looped, the pp=2 one into two stages per rank)."""
    root_p = Path(root)
    train_run(model, root_p / "straight", PP2)
    train_run(model, root_p / "resumed", PP2, crash_after=CRASH_AFTER)
    train_run(model, root_p / "resumed", PP2)
    pp2_ckpt = str(root_p / "straight" / "checkpoints" / f"step-{2 * EVERY}")
    out = {"pp2_in_pp2": load_report(model, pp2_ckpt, PP2, f"{root}/w1"),
           "pp1_in_pp2": load_report(model, pp1_ckpt, PP2, f"{root}/w2")}
    if "model.arch=looped" in model:
        out["pp2_in_interleaved"] = load_report(model, pp2_ckpt, INTERLEAVED, f"{root}/w6", save=True)
    return out


def losses(metrics: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = dcp.FileSystemReader(path).read_metadata()
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for k, m in md.state_dict_metadata.items() if isinstance(m, TensorStorageMetadata)}
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return state


def unpack(b: bytes) -> dict:
    return torch.load(io.BytesIO(b), weights_only=False)


@pytest.fixture(scope="module", params=sorted(MODELS))
def runs(request, tmp_path_factory):
    arch = request.param
    model = MODELS[arch]
    root = tmp_path_factory.mktemp(f"pp_{arch}")
    train_run(model, root / "one", {}, steps=4)  # the one-process checkpoint (final save at step 4)
    pp1_ckpt = str(root / "one" / "checkpoints" / "step-4")
    side = run_distributed(pipeline_side, 2, model, str(root), pp1_ckpt)
    pp2_ckpt = str(root / "straight" / "checkpoints" / f"step-{2 * EVERY}")
    dp2 = run_distributed(load_report, 2, model, pp2_ckpt, {"dp_shard": 2}, str(root / "w3"))
    return {
        "arch": arch, "root": root, "pp1_ckpt": pp1_ckpt, "pp2_ckpt": pp2_ckpt,
        "pp2_in_pp2": [unpack(r["pp2_in_pp2"]) for r in side],
        "pp1_in_pp2": [unpack(r["pp1_in_pp2"]) for r in side],
        "pp2_in_interleaved": [unpack(r["pp2_in_interleaved"]) for r in side if "pp2_in_interleaved" in r],
        "pp2_in_dp2": [unpack(r) for r in dp2],
        "pp2_in_one": [unpack(load_report(model, pp2_ckpt, {}, str(root / "w4")))],
        "pp1_in_one": [unpack(load_report(model, pp1_ckpt, {}, str(root / "w5")))],
    }


def test_pipeline_resume_continues_bitwise_like_an_uninterrupted_run(runs):
    root = runs["root"]
    expect = dict(losses(root / "straight" / "metrics.jsonl"))
    got = losses(root / "resumed" / "metrics.jsonl")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]  # resumed from step-3, not from scratch
    for s, loss in got:
        assert loss == expect[s], (runs["arch"], s, loss, expect[s])  # bitwise


def test_looped_pipeline_holds_the_core_and_tied_embedding_on_both_stages(runs):
    from longtrain.config import load_config
    from longtrain.parallel.pipeline_split import owned_modules, plan_stages

    if runs["arch"] != "looped":
        pytest.skip("the looped model's layout")
    cfg = load_config(None, overrides(MODELS["looped"], runs["root"], PP2))
    owned = [owned_modules(s) for s in plan_stages(cfg, 2)]
    assert all("core" in o for o in owned)
    assert "tok_embeddings" in owned[0] and "head" in owned[1]


def check_loaded(reports: list[dict], ckpt: str, what: str) -> None:
    """Every tensor a rank holds equals the checkpoint's; together the ranks hold all of it."""
    saved = read_checkpoint(ckpt)
    assert not [k for k in saved if ".parts." in k or k.startswith(("model.parts", "optimizer.state.parts"))], what
    held = set()
    for r in reports:
        for k, t in r["tensors"].items():
            assert k in saved, f"{what}: {k} is not in the checkpoint"
            assert torch.equal(t, saved[k]), f"{what}: {k} differs from the checkpoint"
            held.add(k)
    assert held == set(saved), f"{what}: the checkpoint's {sorted(set(saved) - held)[:5]} were not loaded"


def check_losses(got: list[dict], ref: list[dict], what: str) -> None:
    for key in ("before", "after"):
        values = {r[key] for r in got}
        assert len(values) == 1, f"{what}: ranks disagree on the {key} loss: {values}"
        assert got[0][key] == pytest.approx(ref[0][key], rel=RTOL), f"{what}: {key} loss"


def test_pipeline_checkpoint_loads_into_one_process_and_dp_shard(runs):
    ckpt = runs["pp2_ckpt"]
    meta = json.loads(Path(ckpt, "meta.json").read_text())
    assert meta["layout"]["pp"] == 2 and meta["format"] == 2
    ref = runs["pp2_in_pp2"]
    check_loaded(ref, ckpt, "pp=2 into pp=2")
    for name in ("pp2_in_one", "pp2_in_dp2"):
        assert all(r["step"] == 2 * EVERY for r in runs[name]), name
        check_loaded(runs[name], ckpt, name)
        check_losses(runs[name], ref, name)


def test_one_process_checkpoint_loads_into_pipeline(runs):
    ckpt = runs["pp1_ckpt"]
    check_loaded(runs["pp1_in_one"], ckpt, "one process into one process")
    check_loaded(runs["pp1_in_pp2"], ckpt, "one process into pp=2")
    assert all(r["step"] == 4 for r in runs["pp1_in_pp2"])
    check_losses(runs["pp1_in_pp2"], runs["pp1_in_one"], "one process into pp=2")


def test_several_copies_on_one_rank_load_and_save_as_one(runs):
    """Two stages per rank: each rank holds two copies of the looped core. Loading fills both
    (the step after it moves them alike: the copies do not share optimizer state), and a save
    writes one, equal to what every copy holds."""
    if runs["arch"] != "looped":
        pytest.skip("only the looped model has a weight on several stages of one rank")
    got = runs["pp2_in_interleaved"]
    check_loaded(got, runs["pp2_ckpt"], "pp=2 into 2 stages per rank")
    check_losses(got, runs["pp2_in_pp2"], "pp=2 into 2 stages per rank")
    saved = str(runs["root"] / "w6" / "saved" / f"step-{2 * EVERY + 1}")
    check_loaded([{"tensors": r["saved_tensors"]} for r in got], saved, "saved from 2 stages per rank")


PP_TP = {**PP2, "tp": 2}


def four_rank_side(model: list[str], root: str, parallel: dict) -> bytes:
    """On 4 ranks (``parallel``): train 3 steps, then load that checkpoint back."""
    train_run(model, Path(root) / "four", parallel, steps=EVERY)
    return load_report(model, f"{root}/four/checkpoints/step-{EVERY}", parallel, f"{root}/w7")


def check_four_ranks_load_into_one_process(tmp_path, model: list[str], parallel: dict, what: str) -> None:
    four = [unpack(r) for r in run_distributed(four_rank_side, 4, model, str(tmp_path), parallel)]
    ckpt = str(tmp_path / "four" / "checkpoints" / f"step-{EVERY}")
    check_loaded(four, ckpt, f"{what} into itself")
    one = [unpack(load_report(model, ckpt, {}, str(tmp_path / "w8")))]
    check_loaded(one, ckpt, f"{what} into one process")
    check_losses(one, four, f"{what} into one process")


def test_pipeline_with_fsdp_checkpoint_loads_into_one_process(tmp_path):
    """pp=2 x dp_shard=2: the looped core and tied embedding are FSDP DTensors on both pipeline
    groups; each group writes the same chunks under one name, and one process reads them back."""
    check_four_ranks_load_into_one_process(tmp_path, MODELS["looped"], PP_DP, "pp=2 x dp_shard=2")


def test_pipeline_with_tp_and_tied_embeddings_checkpoint_loads_into_one_process(tmp_path):
    """pp=2 x tp=2 with tied embeddings: the embedding (first stage) and the head (last stage) are
    copies of one vocab-sharded weight; both pipeline groups write its shards under one name."""
    model = MODELS["llama"] + ["model.tie_embeddings=true", "model.n_kv_heads=2"]
    check_four_ranks_load_into_one_process(tmp_path, model, PP_TP, "pp=2 x tp=2 tied")
