"""docs/building.md read as the tests check it: its code blocks, what each claims, and the
project the guide's own commands make.

A block's claim is the HTML comment on the line before it:

- `<!-- from PATH -->`: an excerpt of PATH in that project, verbatim; a line `# ...` elides
  (the parts appear in PATH in order);
- `<!-- policy PATH -->`: a policy file a deployment adds on the search path;
- `<!-- edit PATH after: LINE -->`: lines the reader inserts into PATH after LINE;
- none, on a `sh` block: commands, each of a kind the guide test knows how to check.

Blocks of any other language must carry a claim.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from stead.cli import main

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "building.md"
_CLAIM = re.compile(r"^<!-- (from|policy|edit) (\S+)(?: after: (.+))? -->$")
ELIDED = "# ..."


@dataclass(frozen=True)
class Block:
    line: int  # where its fence opens, 1-based
    lang: str
    text: str
    claim: str | None = None
    path: str = ""
    after: str = ""

    @property
    def where(self) -> str:
        return f"docs/building.md:{self.line}"


def blocks(text: str | None = None) -> list[Block]:
    lines = (GUIDE.read_text() if text is None else text).splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == "```")
        claim = _CLAIM.match(lines[i - 1]) if i else None
        found.append(
            Block(
                line=i + 1,
                lang=lines[i][3:].strip(),
                text="\n".join(lines[i + 1 : end]) + "\n",
                claim=claim[1] if claim else None,
                path=claim[2] if claim else "",
                after=(claim[3] or "") if claim else "",
            )
        )
        i = end + 1
    return found


def commands(block: Block) -> list[list[str]]:
    """A shell block's commands as words: continuations joined, comments dropped."""
    joined = block.text.replace("\\\n", " ")
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def make_project(into: Path) -> Path:
    """Run the guide's `stead new` commands as written (and its `cd`s) below `into`; the
    directory the reader ends up in: the project."""
    here = into
    for block in blocks():
        if block.lang != "sh":
            continue
        for words in commands(block):
            if words[0] == "cd":
                here = here / words[1]
            elif Path(words[0]).name == "stead" and words[1] == "new":
                argv = words[1:]
                if argv[1] == "app":
                    argv[2] = str(here / argv[2])
                else:
                    argv += ["--dir", str(here)]
                code: object = None
                try:
                    main(argv)
                except SystemExit as done:
                    code = done.code
                if code not in (0, None):
                    raise AssertionError(f"{block.where}: {' '.join(words)} exited {code}")
    return here


def apply_edits(project: Path, *, gated: bool = True) -> list[Path]:
    """Make the guide's edits to `project`; with `gated=False`, as a careless reader would,
    without their `workflow.patched` gate. The files edited."""
    edited: list[Path] = []
    for block in blocks():
        if block.claim != "edit":
            continue
        path = project / block.path
        lines = path.read_text().splitlines(keepends=True)
        (at,) = [i for i, line in enumerate(lines) if line.strip() == block.after]
        text = block.text
        if not gated:
            text = re.sub(r"workflow\.patched\([^)]*\)", "True", text)
        lines.insert(at + 1, text)
        path.write_text("".join(lines))
        edited.append(path)
    return edited
