"""The seams of rlarith.training: the one override of TRL's internals, the launcher's imports, and the
import graph of the package.

If a TRL upgrade changes what ``GRPOTrainer._generate_and_score_completions`` returns, the first test
here fails and names what changed; rlarith.training.trainer.generated is the one place to adapt.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, rlarith_env
from rlarith.config import load_config
from rlarith.training.trainer import GENERATED_KEYS, Generated, generated


def _zeros_then_ones(mask) -> bool:  # noqa: ANN001 - a (n, L) 0/1 tensor
    return bool((mask[:, 1:] >= mask[:, :-1]).all())


def test_trl_generate_and_score_returns_what_the_adapter_reads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlarith.data import TrainProblems, make_task
    from rlarith.preemption import StopRequest
    from rlarith.tinymodel import init_model
    from rlarith.training.context import RunContext
    from rlarith.training.grpo_config import build_dataset, grpo_config, reward_functions
    from rlarith.training.identity import Attempt
    from rlarith.training.trainer import make_trainer_class

    model_dir = init_model(tmp_path / "model", hidden=32, layers=1, heads=2)
    cfg = load_config(
        REPO / "configs" / "default.yaml",
        [f"model.path={model_dir}", f"runs_dir={tmp_path}", "training.max_steps=1",
         "training.prompts_per_step=2", "training.num_generations=4", "training.max_completion_length=6",
         "training.report_to=[]", "traces.enabled=false"],
    )  # fmt: skip
    run = RunContext(cfg, Attempt("test", 0), StopRequest())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = build_dataset(cfg, TrainProblems(make_task(cfg.task), cfg.data, cfg.training.seed))
    trainer = make_trainer_class()(
        model=AutoModelForCausalLM.from_pretrained(model_dir),
        reward_funcs=reward_functions(cfg, run.rewards),
        args=grpo_config(cfg, 8, None, run.weights),
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.run = run
    inputs = [dataset[i // 4] for i in range(8)]  # each prompt num_generations times, as TRL's sampler does
    output = trainer._generate_and_score_completions(inputs)

    assert set(GENERATED_KEYS) <= set(output), sorted(output)
    batch = generated(output)
    assert isinstance(batch, Generated)
    n = len(inputs)
    assert batch.prompt_ids.shape == batch.prompt_mask.shape and batch.prompt_ids.shape[0] == n
    assert batch.completion_ids.shape == batch.completion_mask.shape and batch.completion_ids.shape[0] == n
    assert tuple(batch.advantages.shape) == (n,)
    assert _zeros_then_ones(batch.prompt_mask), "prompts are no longer left-padded"
    assert _zeros_then_ones(batch.completion_mask.flip(1)), "completions are no longer right-padded"
    # the masks select the real tokens: every prompt decodes to its chat-formatted problem
    for ids, mask, row in zip(batch.prompt_ids, batch.prompt_mask, inputs):
        text = tokenizer.decode(ids[mask.bool()].tolist())
        assert row["prompt"][-1]["content"] in text
    # the reward functions' own values are what the recorder reads, one per completion of this batch
    assert sorted(run.rewards) == sorted(run.reward_names)
    assert all(len(values) == n for values in run.rewards.values())


def test_the_adapter_names_what_a_changed_trl_no_longer_returns() -> None:
    with pytest.raises(RuntimeError, match=r"no longer returns \['advantages'\].*rlarith.training.trainer"):
        generated({key: None for key in GENERATED_KEYS if key != "advantages"})


def test_what_an_overlapped_save_replaces_is_where_it_looks() -> None:
    """async_save.capture replaces serializers by module attribute, and the trainer overrides
    ``_save_checkpoint`` by name: a transformers that moved one fails here, naming it, not at a run's
    first save."""
    import inspect

    import safetensors.torch
    import transformers.modeling_utils as modeling_utils
    from transformers import Trainer

    assert modeling_utils.safe_save_file is safetensors.torch.save_file, (
        "transformers' own safetensors writer"
    )
    assert "_save_checkpoint" in vars(Trainer), "transformers.Trainer._save_checkpoint is gone"
    # the Trainer writes the optimizer and scheduler through the module attribute torch.save
    assert "torch.save(" in inspect.getsource(Trainer._save_optimizer_and_scheduler)


def test_the_launcher_imports_no_torch() -> None:
    code = "import rlarith.launch, sys; assert 'torch' not in sys.modules, 'rlarith.launch imported torch'"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=rlarith_env(), capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr


def _rlarith_imports(path: Path, modules: set[str], typing: bool = False) -> set[str]:
    """The rlarith modules ``path`` imports when run, at any depth of the file (late imports count too):
    ``from rlarith.traces import report`` is an import of the module rlarith.traces.report. ``typing``:
    the ``if TYPE_CHECKING:`` imports count too."""
    tree = ast.parse(path.read_text())
    typing_only = (
        set()
        if typing
        else {  # ``if TYPE_CHECKING:`` imports are for annotations: never run
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body
            for inner in ast.walk(stmt)
        }
    )
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def _cycle_free(typing: bool, within: str = "rlarith") -> dict[str, list[str]]:
    """Fails on an import cycle among the modules under ``within``; returns the graph it checked."""
    root = REPO / "rlarith"
    modules = {
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
        for p in root.rglob("*.py")
    }
    graph = {
        name: sorted(_rlarith_imports(path, set(modules), typing) - {name})
        for name, path in modules.items()
        if name.startswith(within)
    }
    graph = {name: [dep for dep in deps if dep in graph] for name, deps in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            if state.get(dep) == 1:
                cycle = path[path.index(dep) :] + [dep] if dep in path else [name, dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    return graph


def test_the_import_graph_of_rlarith_has_no_cycle() -> None:
    graph = _cycle_free(typing=False)
    assert len(graph) > 30 and "rlarith.training.run" in graph["rlarith.cli"]


def test_training_modules_do_not_even_annotate_in_a_circle() -> None:
    """The trainer calls the recording (and the callbacks the sealing), never the reverse: not even a
    type annotation imports back (``Generated`` lives where it is consumed, in ``recording``)."""
    _cycle_free(typing=True, within="rlarith.training")
