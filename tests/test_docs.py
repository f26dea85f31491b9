"""The documentation runs: every ```python block in docs/, every example script, every recipe YAML.

Conventions (they let the docs show real model names and budgets, yet run here in seconds):

* Model names. Before a block runs, the string "smollm2-135m-instruct" is replaced by the folder of a tiny
  random causal LM (fixture ``tiny_lm_dir``) and "all-minilm-l6-v2" by a tiny random encoder
  (``tiny_encoder_dir``); both are built by ``alignpro_plugins.testing``. While a page runs, the two packaged
  names also *resolve* to those folders (``resolve_model`` is patched), so config defaults that name them
  stay tiny too.
* Budgets. ``max_steps=N``, ``"max_steps": N`` and YAML ``max_steps: N`` become 1, and so do the same forms of
  ``freeze_layers`` (the tiny encoder has two layers).
* Layout. Each page (README.md included) runs in a fresh temporary folder laid out like a checkout: the working
  directory ``<tmp>/project`` holds a copy of ``examples/recipes/`` (rewritten the same way) and of the example
  scripts, ``<tmp>/shared`` links to
  the ``../shared`` folder beside the repository (so ``../shared/data`` resolves, as in CI), and
  ``ALIGNPRO_SHARED_DATA`` points at the same data folder. A page that mentions ``runs/quickstart/`` finds
  there the artifacts of ``examples/quickstart.py --smoke`` (run once per session).
* Order. The blocks of one page run in order, in one namespace, in this process (imports are paid once).
* Hub data sets. The hub ids of ``HUB_SCHEMAS`` read small local files with the same columns (no network).
* ```python no-run <reason>: a block that needs a running server or a GPU; it is compiled but not run, and the
  reason is required. Every other python block runs.
* Examples. Every ``examples/*.py`` runs as ``python examples/X.py --smoke`` in a subprocess, from a temporary
  working directory (scripts added later are picked up by the glob).
* Recipes. Every YAML in ``examples/recipes/`` is parsed as ``alignpro train --dry-run`` parses it (each section
  into its config class, the wiring included; no training), and ``alignpro train --dry-run`` itself runs on it; a
  flat single-stage config is named ``*_<stage>.yaml``. A recipe names no ``../shared`` data (a user has the hub
  and the files its header says how to write), and every hub id it names is one of ``HUB_SCHEMAS``. The
  quickstart recipe runs end to end, its budgets cut to smoke size.

Static checks keep the pages honest:

* ``alignpro`` command lines in shell blocks use real subcommands and flags;
* backticked ``alignpro_plugins.*`` / ``trainers.*`` names import;
* relative links resolve, and docs/index.md links every page;
* a ```yaml block whose first line is ``# examples/recipes/NAME.yaml`` is (below that line) a verbatim copy of
  that file; other ```yaml blocks parse into their config classes (a recipe, or a flat config whose first line
  says ``alignpro <stage> --config``);
* every ``runs/quickstart/...`` path that docs/quickstart.md promises exists after the smoke run.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
RECIPES = ROOT / "examples" / "recipes"
SHARED = ROOT.parent / "shared"
# Pages other engineers write; links to them are checked once they exist.
OWNED_ELSEWHERE = {DOCS / "langchain.md", DOCS / "benchmarks.md"}
RECIPE_KEYS = {"output_dir", "reward", "judge", "guidance", "sft", "rl", "eval"}

# Hub data sets the docs and recipes name, with the columns of their `train` split. Offline, while a page or a
# recipe runs here, each id reads a small local file with those columns, built from the starter set (fixture
# ``hub_stand_ins``); a recipe naming another hub id fails its test until its columns are added here.
HUB_SCHEMAS = {
    "Anthropic/hh-rlhf": ("chosen", "rejected"),  # whole dialogues, split at the last assistant turn
    "Intel/orca_dpo_pairs": ("system", "question", "chosen", "rejected"),
    "THUDM/BPO": ("prompt", "optimized_prompt", "good_res", "bad_res"),
    "databricks/databricks-dolly-15k": ("instruction", "context", "response", "category"),
}
FENCE = re.compile(r"^```([^\n`]*)\n(.*?)^```[ \t]*$", re.M | re.S)
PACKAGED_NAMES = ("smollm2-135m-instruct", "all-minilm-l6-v2")  # what the tiny models stand in for


def pages() -> list[Path]:
    return sorted(DOCS.glob("**/*.md"))


def blocks(path: Path) -> list[tuple[str, str, int]]:
    """(info string, body, line number) of every fenced block."""
    text = path.read_text()
    return [
        (m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 2) for m in FENCE.finditer(text)
    ]


def python_blocks(path: Path) -> list[tuple[str, str, int]]:
    return [b for b in blocks(path) if b[0].split()[:1] == ["python"]]


def runnable(info: str) -> bool:
    return "no-run" not in info.split()


def adapt(text: str, models: dict[str, str]) -> str:
    """Apply the conventions above: tiny models, one step."""
    for name, path in models.items():
        text = text.replace(name, path)
    for key in ("max_steps", "freeze_layers"):  # the tiny encoder has 2 layers
        text = re.sub(rf"\b{key}\s*=\s*\d+", f"{key}=1", text)
        text = re.sub(rf"([\"']{key}[\"']\s*:\s*)\d+", r"\g<1>1", text)
        text = re.sub(rf"(?m)^(\s*{key}:\s*)\d+", r"\g<1>1", text)
    return text


@pytest.fixture
def tiny_models(tiny_lm_dir, tiny_encoder_dir) -> dict[str, str]:
    return {"smollm2-135m-instruct": tiny_lm_dir, "all-minilm-l6-v2": tiny_encoder_dir}


@pytest.fixture(scope="session")
def tiny_shipped_root(tiny_lm_dir, tmp_path_factory) -> Path:
    """A package folder of shipped prompters holding one, under the shipped name: a LoRA on the tiny model that
    stands in for SmolLM2, its manifest naming the packaged base as a shipped one does."""
    import json

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignpro_plugins.manifest import Manifest, weights_hash
    from alignpro_plugins.prompter import Prompter
    from alignpro_plugins.prompters import INDEX_NAME, SHIPPED_PROMPTER, PackagedPrompter

    root = tmp_path_factory.mktemp("prompters")
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
        LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    manifest = Manifest(
        base_model="smollm2-135m-instruct", base_model_hash=weights_hash(tiny_lm_dir), similarity_model=None
    )
    prompter = Prompter(lora.eval(), AutoTokenizer.from_pretrained(tiny_lm_dir), manifest, similarity=None)
    folder = prompter.save_pretrained(root / SHIPPED_PROMPTER)
    prompter.close()
    entry = PackagedPrompter(
        name=SHIPPED_PROMPTER,
        base_model=manifest.base_model,
        base_model_hash=manifest.base_model_hash,
        weights_hash=weights_hash(folder),
        files=tuple(
            sorted(p.name for p in Path(folder).iterdir() if p.is_file() and not p.name.startswith("."))
        ),
        description="a tiny stand-in for the shipped prompter",
        root=root,
    )
    (root / INDEX_NAME).write_text(json.dumps({SHIPPED_PROMPTER: entry.as_dict()}))
    return root


@pytest.fixture
def tiny_resolution(tiny_models, tiny_shipped_root, monkeypatch):
    """While a page runs, the packaged names resolve to the tiny folders (config defaults included), and the
    shipped prompter's name to a tiny one."""
    import alignpro_plugins.embeddings
    import alignpro_plugins.models
    import alignpro_plugins.prompter
    import alignpro_plugins.prompters
    import alignpro_plugins.rewards
    import trainers.reward_trainer  # noqa: F401 - imported so its reference is patched (and restored)

    original = alignpro_plugins.models.resolve_model

    def resolve(name_or_path):
        return tiny_models.get(str(name_or_path).lower()) or original(name_or_path)

    def swap(old, new):
        for name, module in list(sys.modules.items()):
            if (
                name.startswith(("alignpro_plugins", "trainers"))
                and getattr(module, "resolve_model", None) is old
            ):
                module.resolve_model = new

    monkeypatch.setattr(alignpro_plugins.prompters, "PACKAGE_DIR", tiny_shipped_root)
    swap(original, resolve)
    try:
        yield
    finally:
        swap(resolve, original)


@pytest.fixture(scope="session")
def hub_files(tmp_path_factory) -> dict[str, str]:
    """For each id of HUB_SCHEMAS, a local JSONL file with its columns, from the starter set's data."""
    import json

    from alignpro_plugins.data import load_preferences, load_prompts
    from alignpro_plugins.starter import write_starter_set

    folder = tmp_path_factory.mktemp("hub")
    starter = write_starter_set(folder / "starter")
    pairs = load_preferences(starter["preferences"])
    prompts = load_prompts(starter["train_prompts"])
    rows = {
        "Anthropic/hh-rlhf": [
            {
                "chosen": f"\n\nHuman: {p.prompt}\n\nAssistant: {p.chosen}",
                "rejected": f"\n\nHuman: {p.prompt}\n\nAssistant: {p.rejected}",
            }
            for p in pairs
        ],
        "Intel/orca_dpo_pairs": [
            {"system": "", "question": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs
        ],
        "THUDM/BPO": [
            {"prompt": x, "optimized_prompt": f"{x} Be specific.", "good_res": "", "bad_res": ""}
            for x in prompts
        ],
        "databricks/databricks-dolly-15k": [
            {"instruction": x, "context": "", "response": "", "category": "open_qa"}
            for x in load_prompts(starter["heldout_prompts"])
        ],
    }
    files = {}
    for hub_id, data in rows.items():
        assert set(data[0]) == set(HUB_SCHEMAS[hub_id]), hub_id
        files[hub_id] = str(folder / f"{hub_id.replace('/', '__')}.jsonl")
        Path(files[hub_id]).write_text("".join(json.dumps(r) + "\n" for r in data))
    return files


@pytest.fixture
def hub_stand_ins(hub_files, monkeypatch) -> dict[str, str]:
    """While a test runs, the hub ids of HUB_SCHEMAS read their local stand-ins (no network)."""
    import alignpro_plugins.data

    original = alignpro_plugins.data.read_located

    def read_located(source, **kwargs):
        return original(hub_files.get(str(source), source), **kwargs)

    monkeypatch.setattr(alignpro_plugins.data, "read_located", read_located)
    return hub_files


def run_script(script: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, str(script), "--smoke", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="session")
def quickstart_smoke(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """``examples/quickstart.py --smoke`` once per session: its artifacts under <tmp>/runs/quickstart."""
    work = tmp_path_factory.mktemp("quickstart")
    out_dir = work / "runs" / "quickstart"
    return out_dir, run_script(ROOT / "examples" / "quickstart.py", work, "--out", str(out_dir))


@pytest.fixture
def checkout(tmp_path, monkeypatch, tiny_models) -> Path:
    """A temporary working directory laid out like a checkout (see the module docstring)."""
    project = tmp_path / "project"
    (project / "examples" / "recipes").mkdir(parents=True)
    for src in RECIPES.glob("*.yaml"):
        (project / "examples" / "recipes" / src.name).write_text(adapt(src.read_text(), tiny_models))
    for src in (ROOT / "examples").glob("*.py"):  # the scripts a page runs (examples/split_prompts.py)
        (project / "examples" / src.name).write_text(src.read_text())
    if SHARED.exists():
        (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    monkeypatch.setenv("ALIGNPRO_SHARED_DATA", str(SHARED / "data"))
    monkeypatch.chdir(project)
    return project


# ---------------------------------------------------------------------------------------------- docs pages
PAGES_WITH_CODE = [
    p for p in [ROOT / "README.md", *pages()] if any(runnable(i) for i, _, _ in python_blocks(p))
]


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_python_blocks_run_in_order(
    page, checkout, tiny_models, tiny_resolution, hub_stand_ins, request
):
    if "runs/quickstart/" in page.read_text():
        out_dir, run = request.getfixturevalue("quickstart_smoke")
        assert run.returncode == 0, run.stderr[-3000:]
        (checkout / "runs").mkdir(exist_ok=True)
        (checkout / "runs" / "quickstart").symlink_to(out_dir, target_is_directory=True)
    namespace: dict = {"__name__": "__main__"}
    for info, body, line in python_blocks(page):
        code = compile(adapt(body, tiny_models), f"{page.relative_to(ROOT)}:{line}", "exec")
        if runnable(info):
            exec(code, namespace)  # noqa: S102 - running the docs is the point


def test_every_python_block_compiles_and_no_run_blocks_say_why():
    no_run = []
    for page in pages():
        for info, body, line in python_blocks(page):
            compile(body, f"{page}:{line}", "exec")
            if not runnable(info):
                reason = info.split("no-run", 1)[1].strip()
                assert reason, f"{page}:{line}: a no-run block needs a one-line reason"
                no_run.append((page, line))
    owned = [p for p, _ in no_run if p not in OWNED_ELSEWHERE and p.name != "dspy.md"]
    assert len(owned) <= 3, f"no-run should be rare: {no_run}"


# ---------------------------------------------------------------------------------------------- examples
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_runs_with_smoke(script, tmp_path, request):
    if script.name == "quickstart.py":
        _, out = request.getfixturevalue("quickstart_smoke")  # shared with the docs pages
    else:
        out = run_script(script, tmp_path)
    assert out.returncode == 0, f"{script.name} --smoke failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def test_quickstart_page_lists_real_artifacts(quickstart_smoke):
    out_dir, run = quickstart_smoke
    assert run.returncode == 0, run.stderr[-3000:]
    promised = set(re.findall(r"runs/quickstart/([\w./-]*\w)", (DOCS / "quickstart.md").read_text()))
    assert len(promised) >= 5
    for rel in sorted(promised):
        assert (out_dir / rel).exists(), f"docs/quickstart.md promises runs/quickstart/{rel}"
    for name in ("preferences.jsonl", "train_prompts.json", "heldout_prompts.json"):
        assert (out_dir / "data" / name).exists()
    for name in ("alignpro_reward.json", "model.safetensors"):
        assert (out_dir / "reward" / name).exists()
    for stage in ("sft", "rl"):
        assert (out_dir / stage / "alignpro.json").exists() and (out_dir / stage / "metrics.jsonl").exists()
    assert (out_dir / "sft" / "bootstrap.jsonl").exists()
    for name in (
        "results.md",
        "results.json",
        "records.jsonl",
        "reward_distributions.png",
        "rl_reward_curve.png",
    ):
        assert (out_dir / "eval" / name).exists(), name


# ---------------------------------------------------------------------------------------------- recipes
def _stage_classes() -> dict[str, tuple[type, ...]]:
    """Each stage's config classes: its default one, then one per other algorithm (e.g. rl's kl-optimum)."""
    from alignpro_plugins.cli import ALGORITHM_CONFIGS, STAGES, _load

    classes = {stage: (_load(ref),) for stage, (ref, _) in STAGES.items()}
    for (stage, _), ref in ALGORITHM_CONFIGS.items():
        classes[stage] += (_load(ref),)
    return classes


def _validate_config(data: dict, where: str, *, flat_stage: str | None = None) -> list:
    """Parse a recipe the way `alignpro train --dry-run` does (every section, wiring included), or a flat
    single-stage config; every YAML value must arrive unchanged in its config."""
    from alignpro_plugins.cli import _recipe_plan, parse_stage_config

    classes = _stage_classes()
    assert isinstance(data, dict), f"{where}: expected a mapping"
    if flat_stage is None:
        assert set(data) <= RECIPE_KEYS, f"{where}: unknown sections {sorted(set(data) - RECIPE_KEYS)}"
        recipe = Path("recipe-under-test.yaml")
        recipe.write_text(yaml.safe_dump(data))
        try:
            plan = _recipe_plan(str(recipe))
        finally:
            recipe.unlink()
        stages = [(s, data[s] or {}, plan.stages[s][0]) for s in plan.stages]
    else:
        stages = [(flat_stage, data, parse_stage_config(flat_stage, [], data))]
    configs = []
    for stage, section, cfg in stages:
        assert isinstance(section, dict), f"{where}: section {stage}: expected a mapping"
        if stage == "eval":  # `alignpro eval` arguments; the keys are its flags
            for key, value in section.items():
                got = getattr(cfg, key.replace("-", "_"))
                assert got == value or [str(v) for v in got] == [str(v) for v in value], (
                    f"{where}: eval.{key}"
                )
            configs.append(cfg)
            continue
        assert isinstance(cfg, classes["reward" if stage == "judge" else stage])
        for key, value in section.items():  # YAML values arrive unchanged in the config
            got = getattr(cfg, key)
            same = got == value or getattr(got, "value", None) == value or str(got) == str(value)
            assert same or key in ("bf16", "report_to"), f"{where}: {stage}.{key}: {value!r} became {got!r}"
        configs.append(cfg)
    return configs


def _data_sources(data) -> list[str]:
    """Every data source a recipe names: the values of its data keys and of eval's prompts."""
    keys = {
        "preference_data",
        "prompts_data",
        "pairs_data",
        "validation_data",
        "exclude_prompt_files",
        "prompts",
    }
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if key in keys:
                found += value if isinstance(value, list) else [value]
            else:
                found += _data_sources(value)
    return found


def _is_hub_id(source: str) -> bool:
    from alignpro_plugins.data import LOCAL_SUFFIXES

    return (
        source.count("/") == 1
        and not source.startswith((".", "/", "~", "runs/"))
        and not (source.endswith(LOCAL_SUFFIXES))
    )


RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))


def test_there_are_recipes():
    assert len(RECIPE_FILES) >= 6


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.name)
def test_recipe_yaml_parses_into_stage_configs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # parsing must not leave anything behind in the checkout
    data = yaml.safe_load(path.read_text())
    if set(data) <= RECIPE_KEYS:
        assert {"reward", "sft", "rl"} & set(data), f"{path.name}: no stage sections"
        configs = _validate_config(data, path.name)
    else:
        stage = path.stem.rsplit("_", 1)[-1]
        assert stage in _stage_classes(), f"{path.name}: a flat config must be named *_<stage>.yaml"
        configs = _validate_config(data, path.name, flat_stage=stage)
    assert configs
    sources = _data_sources(data)
    # A user has the hub and the files a recipe's header says how to write, never this machine's ../shared.
    assert sources and not [s for s in sources if s.startswith("../")], f"{path.name}: {sources}"
    unknown = {s for s in sources if _is_hub_id(s)} - set(HUB_SCHEMAS)
    assert not unknown, (
        f"{path.name}: hub data sets whose columns tests/test_docs.py does not stand in for: {unknown}"
    )
    assert path.read_text().startswith("#"), f"{path.name}: start with a comment saying how to run it"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "path",
    [p for p in RECIPE_FILES if set(yaml.safe_load(p.read_text())) <= RECIPE_KEYS],
    ids=lambda p: p.name,
)
def test_alignpro_train_dry_run_checks_every_recipe_and_trains_nothing(path, tmp_path, monkeypatch, capsys):
    from alignpro_plugins.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(path.read_text())
    stages = [line.split()[0] for line in out.splitlines() if " -> " in line]
    assert stages == [s for s in ("reward", "judge", "guidance", "sft", "rl", "eval") if s in data]
    assert "nothing run (--dry-run)" in out and list(tmp_path.iterdir()) == []
    if "eval" in data:  # the evaluation is wired to the recipe's own artifacts and target
        root = data["output_dir"]
        assert f"prompter: {root}/rl" in out and f"judge: {root}/reward" in out
        assert ("judge" not in data) or f"independent_judge: {root}/judge" in out


def test_yaml_blocks_in_docs_are_recipe_copies_or_valid_sections(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = 0
    for page in pages():
        for info, body, line in blocks(page):
            if info != "yaml":
                continue
            where = f"{page.relative_to(ROOT)}:{line}"
            first = body.splitlines()[0] if body.strip() else ""
            m = re.match(r"#\s*(examples/recipes/\S+\.yaml)", first)
            if m:
                copy = body.split("\n", 1)[1]  # the block, without its "# examples/recipes/..." header line
                assert (ROOT / m.group(1)).read_text().strip() == copy.strip(), (
                    f"{where}: differs from {m.group(1)}"
                )
                seen += 1
                continue
            data = yaml.safe_load(body)
            flat = re.search(r"alignpro (\w+) --config", first)
            if flat:
                _validate_config(data, where, flat_stage=flat.group(1))
            elif isinstance(data, dict) and set(data) <= RECIPE_KEYS:
                _validate_config(data, where)
    assert seen >= 5


# ---------------------------------------------------------------------------------------------- static checks
def _cli_options() -> dict[str, set[str] | None]:
    from alignpro_plugins.cli import STAGES, build_parser

    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    options: dict[str, set[str] | None] = {}
    for name, parser in sub.choices.items():
        if name in STAGES:
            classes = _stage_classes()[name]
            fields = {f.name for cls in classes for f in dataclasses.fields(cls)} | {"config", "help"}
            options[name] = {f"--{f}" for f in fields} | {f"--{f.replace('_', '-')}" for f in fields}
        else:
            options[name] = set(parser._option_string_actions)
    return options


def _command_lines(body: str) -> list[str]:
    return [
        ln for ln in body.replace("\\\n", " ").splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]


def alignpro_invocations(cmd: str) -> list[list[str]]:
    """The arguments of each `alignpro ...` or `... -m alignpro_plugins.cli ...` in one shell line."""
    try:
        words = shlex.split(cmd, comments=True)
    except ValueError:
        return []
    segments: list[list[str]] = [[]]
    for w in words:
        if w in ("&&", "||", ";", "|"):
            segments.append([])
        else:
            segments[-1].append(w)
    found = []
    for seg in segments:
        while seg and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", seg[0]):
            seg = seg[1:]  # VAR=value prefixes
        if seg and seg[0] == "alignpro":
            found.append(seg[1:])
        elif "alignpro_plugins.cli" in seg:
            i = seg.index("alignpro_plugins.cli")
            if i > 0 and seg[i - 1] == "-m":
                found.append(seg[i + 1 :])
    return [[w for w in args if w not in ("-v", "--verbose")] for args in found]


def test_alignpro_commands_in_docs_use_real_subcommands_and_flags():
    options = _cli_options()
    checked = 0
    for page in pages():
        for info, body, line in blocks(page):
            if info not in ("bash", "sh", "console", "shell"):
                continue
            for cmd in _command_lines(body):
                for args in alignpro_invocations(cmd):
                    if not args or args[0] in ("--help", "-h"):
                        continue
                    where = f"{page.relative_to(ROOT)}:{line}: {cmd.strip()}"
                    assert args[0] in options, f"{where}: unknown subcommand {args[0]!r}"
                    for w in args[1:]:
                        if w in (">", "2>&1") or w.startswith(">"):
                            break
                        if w.startswith("--"):
                            flag = w.split("=", 1)[0]
                            assert flag in options[args[0]], f"{where}: `alignpro {args[0]}` has no {flag}"
                    checked += 1
    assert checked >= 10


DOTTED = re.compile(r"`((?:alignpro_plugins|trainers)(?:\.[A-Za-z_]\w*)+)`")


def _resolve(dotted: str):
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:n]))
        except ImportError:
            continue
        for attr in parts[n:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def test_backticked_python_names_exist():
    names = {m.group(1) for p in pages() for m in DOTTED.finditer(p.read_text())}
    assert names
    missing = []
    for name in sorted(names):
        try:
            _resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
    assert not missing, f"documented names that do not exist: {missing}"


LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)\s]*)?\)")


def test_relative_links_resolve():
    for page in pages():
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path = (page.parent / target).resolve()
            if path in OWNED_ELSEWHERE and not path.exists():
                continue  # written by another engineer; checked once it lands
            assert path.exists(), f"{page.relative_to(ROOT)}: broken link {target}"


ANCHORED_LINK = re.compile(r"\]\(([^)\s#]*)#([^)\s]+)\)")


def github_anchors(path: Path) -> set[str]:
    """The anchors GitHub gives a page's headings: lowercase, punctuation dropped, spaces to hyphens, -1 on repeats."""
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        if in_fence or not (m := re.match(r"#{1,6} (.+)", line)):
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_github_anchors_follow_githubs_rules(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# A `code` title: it's done — twice\n```\n# not a heading\n```\n## Repeat\n## Repeat\n")
    assert github_anchors(page) == {"a-code-title-its-done--twice", "repeat", "repeat-1"}


def test_anchored_links_point_at_existing_headings():
    broken = []
    for page in [*pages(), ROOT / "README.md"]:
        for target, anchor in ANCHORED_LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue
            path = (page.parent / target).resolve() if target else page
            if path.suffix == ".md" and path.exists() and anchor not in github_anchors(path):
                broken.append(f"{page.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, f"links to headings that do not exist: {broken}"


def test_index_links_every_page():
    index = (DOCS / "index.md").read_text()
    linked = {(DOCS / t).resolve() for t in LINK.findall(index)}
    for page in pages():
        if page.name != "index.md":
            assert page.resolve() in linked, f"docs/index.md does not link {page.relative_to(DOCS)}"


def test_tiny_model_names_are_the_packaged_ones():
    from alignpro_plugins.models import PACKAGED_MODELS

    assert set(PACKAGED_NAMES) == set(PACKAGED_MODELS)


def test_every_test_the_guarantees_page_names_exists():
    """docs/guarantees.md backs each promise with tests: `file.py::test_name`, then bare `test_name`s of that
    file. A renamed or deleted test must not leave a promise backed by nothing."""
    named = re.findall(
        r"`(?:tests/)?(test_\w+\.py)(?:::(test_\w+))?`|`(test_\w+)`", (DOCS / "guarantees.md").read_text()
    )
    sources: dict[str, str] = {}
    missing, current = [], None
    for file, name, bare in named:
        if file:
            current = file
            path = ROOT / "tests" / file
            if not path.exists():
                missing.append(file)
                continue
            sources[file] = path.read_text()
        test = name or bare
        if test and (current not in sources or not re.search(rf"def {test}\(", sources[current])):
            missing.append(f"{current}::{test}")
    assert named and not missing, f"docs/guarantees.md names tests that do not exist: {missing}"


# ---------------------------------------------------------------------------------------------- a recipe, run
# The quickstart recipe's own sections and keys, with budgets cut to smoke size (tiny models come from the
# ``checkout`` fixture): the wiring of all six stages is what runs, not a copy of it.
SMOKE_BUDGETS = {
    "reward": {"max_steps": 1, "max_length": 64, "freeze_layers": 1, "report_to": "none"},
    "guidance": {"validation_prompts": 2, "min_prompts": 2, "target_max_new_tokens": 8},
    "sft": {
        "num_train_epochs": 1,
        "prompter_max_new_tokens": 8,
        "target_max_new_tokens": 8,
        "report_to": "none",
    },
    "rl": {
        "prompts_per_round": 2,
        "validation_prompts": 2,
        "num_generations": 2,
        "per_device_train_batch_size": 2,
        "max_completion_length": 8,
        "target_max_new_tokens": 8,
        "report_to": "none",
    },
    "eval": {"limit": 3, "max_new_tokens": 6},
}


def test_the_quickstart_recipe_runs_end_to_end_at_smoke_size(checkout, tiny_resolution, capsys):
    import json

    from alignpro_plugins.cli import main
    from alignpro_plugins.starter import write_starter_set

    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import split_prompts
    finally:
        sys.path.remove(str(ROOT / "examples"))
    write_starter_set("runs/starter")  # the commands of the recipe's header, at smoke size
    split_prompts.main(
        ["runs/starter/train_prompts.json", "--out", "runs/starter", "--search", "4"]
        + ["--validation", "2", "--rl", "2"]
    )
    recipe = yaml.safe_load(Path("examples/recipes/quickstart.yaml").read_text())
    for section, budget in SMOKE_BUDGETS.items():
        assert set(budget) - {"report_to", "limit"} <= set(recipe[section]), section  # sizes only
        recipe[section].update(budget)
    Path("smoke.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["train", "--config", "smoke.yaml"]) == 0
    root = Path(recipe["output_dir"])
    printed = capsys.readouterr().out
    assert "| rerank |" in printed and f"artifacts under {root}" in printed

    reward = json.loads((root / "reward" / "alignpro_reward.json").read_text())
    judge = json.loads((root / "judge" / "alignpro_reward.json").read_text())
    assert (reward["prompt_shard"], judge["prompt_shard"]) == (
        0,
        1,
    )  # the judge inherits reward:, another shard
    assert not set(reward["train_prompt_digests"]) & set(judge["train_prompt_digests"])
    searched = json.loads((root / "guidance" / "guidance_search.json").read_text())
    boot = [json.loads(line) for line in (root / "sft" / "bootstrap.jsonl").read_text().splitlines()]
    assert len(boot) == 4 and all(row["candidates"][0]["text"] == searched["best"] for row in boot)
    stages = json.loads((root / "rl" / "alignpro.json").read_text())["provenance"]["stages"]
    assert [s["stage"] for s in stages] == ["sft", "rl"] and stages[-1]["algorithm"] == "kl-optimum"
    summary = json.loads((root / "eval" / "results.json").read_text())["summary"]
    assert summary["judges"] == ["reward", "independent"] and summary["n_prompts"] == 3
    assert set(summary["configs"]) == {
        "frozen",
        "template",
        "zero-shot",
        "sft",
        "align-pro",
        "rerank",
        "best-of-2",
    }
    assert summary["configs"]["rerank"]["target_calls_per_prompt"] == 2.0
    assert (root / "eval" / "rl_reward_curve.png").exists()  # the RL log was wired in

    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    assert main(["train", "--config", "smoke.yaml", "--skip-done"]) == 0
    assert capsys.readouterr().out.count("skipping ") == 6
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_a_recipe_judge_must_not_share_the_reward_models_prompts(tmp_path, monkeypatch, capsys):
    from alignpro_plugins.cli import main

    monkeypatch.chdir(tmp_path)
    recipe = {"output_dir": "o", "reward": {"preference_data": ["p.jsonl"], "prompt_shard": 0}, "judge": {}}
    for judge, ok in (({}, False), ({"prompt_shard": 0}, False), ({"prompt_shard": 1}, True)):
        recipe["judge"] = judge
        Path("r.yaml").write_text(yaml.safe_dump(recipe))
        assert main(["train", "--config", "r.yaml", "--dry-run"]) == (0 if ok else 2)
        if not ok:
            assert (
                "section judge: the judge would train on the reward model's prompts"
                in capsys.readouterr().err
            )
    Path("r.yaml").write_text(yaml.safe_dump({"output_dir": "o", "judge": {"prompt_shard": 1}}))
    assert main(["train", "--config", "r.yaml", "--dry-run"]) == 2
    assert (
        "section judge: it takes the reward: section's keys; add a reward: section" in capsys.readouterr().err
    )


def test_a_recipe_eval_section_takes_alignpro_evals_flags_and_is_checked_first(tmp_path, monkeypatch, capsys):
    from alignpro_plugins.cli import main

    monkeypatch.chdir(tmp_path)
    base = {"output_dir": "o", "reward": {"preference_data": ["p.jsonl"]}}
    for section, error in (
        ({"prompts": ["h.json"], "best_of_m": [2]}, "unknown key 'best_of_m' (did you mean best_of_n?)"),
        ({"prompts": ["h.json"], "rerank": True}, "--rerank answers x and the trained prompter's rewrite"),
        ({"prompts": ["h.json"], "limit": "all"}, "argument --limit: invalid int value: 'all'"),
        ({"rerank": False}, "the following arguments are required: --prompts"),
    ):
        Path("r.yaml").write_text(yaml.safe_dump({**base, "eval": section}))
        assert main(["train", "--config", "r.yaml"]) == 2
        assert f"r.yaml, section eval: {error}" in capsys.readouterr().err
        assert not Path("o").exists()  # refused before the reward stage ran
