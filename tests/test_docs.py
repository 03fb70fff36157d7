"""The documentation is true: the README stays short, every relative link lands, every config field is documented.

Each check is a small function that returns its problems (empty when the docs are right), so a failure lists
all of them at once, and each has a unit test that feeds it a known-bad input to prove it can fail.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from urllib.parse import unquote

from pydantic import BaseModel

from flywheel.config import FlywheelConfig

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
CONFIG_REFERENCE = REPO / "docs" / "configs.md"
README_MAX_WORDS = 2500

# --- markdown reading ---------------------------------------------------------------------------------------

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?!`)(.+?)(?<!`)\1(?!`)")
# [text](target "title") and ![alt](target); the text may hold one level of brackets, the target parentheses
_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]"
    r"\(\s*(<[^>\n]*>|(?:[^\s()]|\([^\s()]*\))*)(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)"
)
_LINK_DEFINITION = re.compile(r"^ {0,3}\[[^\]]+\]:\s*(<[^>\n]*>|\S+)", re.MULTILINE)
_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_HTML_ID = re.compile(r"<[^>]*\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.IGNORECASE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:|^//")


def prose_lines(text: str) -> list[str]:
    """The file's lines with fenced code blocks blanked (so line numbers still count from 1 the same way)."""
    out, fence = [], None
    for line in text.splitlines():
        match = _FENCE.match(line)
        if fence is None and match:
            fence = match.group(1)
            out.append("")
        elif fence is not None:
            if match and match.group(1)[0] == fence[0] and len(match.group(1)) >= len(fence) \
                    and not line.strip()[len(match.group(1)):].strip():
                fence = None
            out.append("")
        else:
            out.append(line)
    return out


def _blank_code_spans(line: str) -> str:
    """Inline code as spaces: `[x](y)` written as code is an example, not a link."""
    return _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation (but `-`, `_`, spaces) removed, spaces to `-`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link or image reads as its text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags render as nothing
    text = text.strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(text: str) -> set[str]:
    """Every `#anchor` a markdown file offers: its ATX headings' slugs (repeats get -1, -2...) and HTML ids."""
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose_lines(text):
        found.update(_HTML_ID.findall(line))
        match = _HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2) or "")
        if slug in counts:
            base = slug
            while slug in counts:
                counts[base] += 1
                slug = f"{base}-{counts[base]}"
        counts[slug] = 0
        found.add(slug)
    return found


def links_in(text: str) -> list[tuple[int, str]]:
    """(line, target) of every inline link, image and link definition outside code."""
    lines = [_blank_code_spans(line) for line in prose_lines(text)]
    prose = "\n".join(lines)
    found = [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in _LINK.finditer(prose)]
    found += [(prose.count("\n", 0, m.start()) + 1, m.group(1)) for m in _LINK_DEFINITION.finditer(prose)]
    return sorted((line, target.strip("<>")) for line, target in found)


def broken_links(path: Path, root: Path = REPO) -> list[str]:
    """`file:line -> target` for each relative link in `path` whose file, or `#anchor` in it, does not exist."""
    problems = []
    text = path.read_text(encoding="utf-8")
    for line, target in links_in(text):
        if not target or _SCHEME.match(target):
            continue  # http(s), mailto and other URLs are not files here
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part)
        if file_part.startswith("/"):
            dest = root / file_part.lstrip("/")  # GitHub reads /x as the repository's root
        else:
            dest = (path.parent / file_part) if file_part else path
        where = f"{path.relative_to(root)}:{line} -> {target}"
        if not dest.exists():
            problems.append(f"{where} (no such file)")
        elif anchor and dest.is_file() and dest.suffix.lower() == ".md" \
                and unquote(anchor).lower() not in anchors_of(dest.read_text(encoding="utf-8")):
            problems.append(f"{where} (no heading with that anchor in {dest.name})")
    return problems


def documentation_files(root: Path = REPO) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def readme_too_long(text: str, limit: int = README_MAX_WORDS) -> str | None:
    """A message when `text` has more than `limit` words, counted as `wc -w` does (whitespace-separated)."""
    words = len(text.split())
    return f"README.md has {words} words; keep it at most {limit} (move detail into docs/)" if words > limit else None


# --- configuration fields -----------------------------------------------------------------------------------


def _models_in(annotation: typing.Any) -> list[type[BaseModel]]:
    """The pydantic models inside a field's type: itself, or inside Optional/Union/Annotated/list/dict/tuple."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin is None:
        return []
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        args = args[:1]
    elif origin is dict:
        args = args[1:]  # a dict's keys are names, not sections
    elif origin is typing.Literal:
        return []
    return [m for arg in args for m in _models_in(arg)]


def config_fields(model: type[BaseModel] = FlywheelConfig, prefix: str = "") -> dict[str, bool]:
    """Every field's dotted path (`midtrain.loss_kernel`, `data.sources.weight`: list items have no index), mapped
    to whether the field holds a section (a model) of its own."""
    fields: dict[str, bool] = {}
    for name, info in model.model_fields.items():
        path = f"{prefix}{name}"
        nested = _models_in(info.annotation)
        fields[path] = bool(nested)
        for sub in nested:
            fields.update(config_fields(sub, f"{path}."))
    return fields


def _code_span_names(text: str) -> set[str]:
    """What the code spans of `text` name: `x`, `x: choices`, `a.b`, and each of `{a, b}`."""
    names = set()
    for match in _CODE_SPAN.finditer(text):
        span = match.group(2).strip()
        if span.startswith("{") and span.endswith("}"):
            names.update(part.strip() for part in span[1:-1].split(","))
        elif ident := re.match(r"[A-Za-z_][\w.]*(?=$|[:\s])", span):
            names.add(ident.group(0))
    return names


def reference_rows(text: str) -> list[tuple[set[str], set[str]]]:
    """(paths named in the first cell, names in code spans anywhere in the row) for each table row."""
    rows = []
    for line in prose_lines(text):
        if not line.lstrip().startswith("|") or re.fullmatch(r"[\s|:-]+", line):
            continue
        cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
        rows.append((_code_span_names(cells[0]), _code_span_names(line)))
    return rows


def undocumented_fields(fields: dict[str, bool], reference: str) -> list[str]:
    """The config fields the reference's table does not document.

    A field at dotted path P (parent path Q, name N) is documented when a row of the table
      (a) names P in a code span in its first cell (`midtrain`, `data.workers`), or
      (b) names Q in a code span in its first cell and N in a code span anywhere in the row
          (`loss_kernel`, `loss_kernel: auto|...`, or one of `{metric, max_drop}`), or
      (c) P holds a section and the row's first cell names a path under it (`data.sources` documents `data`).
    """
    rows = reference_rows(reference)
    missing = []
    for path, is_section in fields.items():
        parent, _, name = path.rpartition(".")
        documented = any(
            path in keys
            or (name in names and (parent in keys if parent else False))
            or (is_section and any(k.startswith(f"{path}.") for k in keys))
            for keys, names in rows
        )
        if not documented:
            missing.append(path)
    return missing


# --- the documentation as it is -----------------------------------------------------------------------------


def test_readme_is_at_most_2500_words():
    problem = readme_too_long(README.read_text(encoding="utf-8"))
    assert problem is None, problem


def test_every_relative_link_in_readme_and_docs_resolves():
    problems = [p for path in documentation_files() for p in broken_links(path)]
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_every_config_field_is_documented_in_the_config_reference():
    """Every field of FlywheelConfig, walked into nested sections, has a row in docs/configs.md's table: the row
    names its dotted path in the first cell (`data.workers`), or names its parent there and the field's own name
    in a code span (`midtrain` ... `loss_kernel: auto|...`); see `undocumented_fields` for the exact rule."""
    fields = config_fields()
    assert {"midtrain.loss_kernel", "promotion.approval", "data.sources.weight"} <= fields.keys()  # the walk works
    missing = undocumented_fields(fields, CONFIG_REFERENCE.read_text(encoding="utf-8"))
    assert not missing, "fields not in docs/configs.md's table: " + ", ".join(missing)


# --- the checks can fail ------------------------------------------------------------------------------------


def test_word_limit_catches_a_long_readme_and_says_the_count():
    assert readme_too_long("one two\nthree", limit=3) is None
    assert "4 words" in readme_too_long("one two\nthree  four", limit=3)


def test_link_check_catches_missing_files_and_anchors_but_not_code_or_urls(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "other.md").write_text("# Other page\n## Set up: step 1\n## Set up: step 1\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "# Page title\n"
        "[fine](other.md) [fine](other.md#set-up-step-1) [fine](other.md#set-up-step-1-1) [fine](#page-title)\n"
        "[web](https://example.com/nowhere.md) [mail](mailto:a@b.c) `[code](nowhere.md)`\n"
        "```\n[fenced](nowhere.md)\n```\n"
        "[gone](missing.md)\n"
        "![gone image](img/missing.png)\n"
        "[bad anchor](other.md#no-such-heading)\n"
        "[bad self anchor](#nowhere)\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "docs/page.md:7 -> missing.md (no such file)",
        "docs/page.md:8 -> img/missing.png (no such file)",
        "docs/page.md:9 -> other.md#no-such-heading (no heading with that anchor in other.md)",
        "docs/page.md:10 -> #nowhere (no heading with that anchor in page.md)",
    ]


def test_github_slugs_match_githubs_rule():
    assert github_slug("Set up: step 1 (GPU)") == "set-up-step-1-gpu"
    assert github_slug("The `full` size of `flywheel/ablation/catalogue.py`") == \
        "the-full-size-of-flywheelablationcataloguepy"
    assert github_slug("`max_drop` and [a link](x.md)") == "max_drop-and-a-link"
    assert anchors_of("# A\n## A\n```\n# A\n```\n## A\n") == {"a", "a-1", "a-2"}


def test_config_walk_reaches_fields_inside_optional_lists_and_dicts():
    class Leaf(BaseModel):
        depth: int = 0

    class Root(BaseModel):
        one: Leaf | None = None
        many: list[Leaf] = []
        named: dict[str, Leaf] = {}
        plain: int = 0

    assert config_fields(Root) == {
        "one": True, "one.depth": False, "many": True, "many.depth": False,
        "named": True, "named.depth": False, "plain": False,
    }


def test_field_check_catches_an_undocumented_field():
    fields = {"midtrain": True, "midtrain.lr": False, "midtrain.seq_len": False, "data": True,
              "data.workers": False, "promotion.guards": True, "promotion.guards.max_drop": False}
    reference = (
        "| section | what it sets |\n|---|---|\n"
        "| `midtrain` | `lr: float`, the sequence length |\n"  # seq_len is named but not in a code span
        "| `data.workers` | processes |\n"
        "| `promotion.guards` | each `{metric, max_drop}` |\n"
        "```\n| `midtrain` | `seq_len` |\n```\n"  # a table in a code block is an example, not the reference
    )
    assert undocumented_fields(fields, reference) == ["midtrain.seq_len"]


def _demo_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo_readme", REPO / "scripts" / "demo_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_demo_block_is_the_scripts_rendering_of_a_recorded_run():
    """The README's demo table is what scripts/demo_readme.py wrote from one real `make demo`, not a hand edit."""
    import json

    script = _demo_script()
    result = json.loads(script.RESULT.read_text())
    readme = README.read_text()
    block = readme[readme.index(script.START):readme.index(script.END) + len(script.END)]
    assert block == script.render(result), "README.md's demo block was edited by hand: run scripts/demo_readme.py"
    assert result["printed"][0].startswith("metric | round 0 | round 1 | round 2"), result["printed"][0]
    assert any(line.startswith("round 2: ") for line in result["printed"]), "the verdicts were kept"


def test_the_demo_script_keeps_the_printed_table_and_verdicts_only():
    script = _demo_script()
    printed = ("round 2  promote  rejected demo-rl v3, kept v2  (0 s)\nmetric | round 0 | round 1\n--- | --- | ---\n"
               "post/eval/avg | 0.3764 | 0.4101\nround 1: promoted: first\nplot: /x/demo-rounds.png\ndemo took 9 s.\n")
    assert script.printed_table(printed) == ["metric | round 0 | round 1", "--- | --- | ---",
                                             "post/eval/avg | 0.3764 | 0.4101", "round 1: promoted: first"]
    block = script.render({"date": "2026-12-07", "commit": "abc1234", "machine": "a CPU", "install_s": 60,
                           "demo_s": 400, "printed": script.printed_table(printed)})
    assert "460 s in all from a fresh clone: the install 60 s" in block and "- round 1: promoted: first" in block
