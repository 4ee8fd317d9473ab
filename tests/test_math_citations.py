"""Every ``SHIQ_MATH §N`` that the code cites names a section of ``docs/SHIQ_MATH.md``."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CITATION = re.compile(r"SHIQ_MATH ((?:§\d+)(?:(?:-|, | and )§\d+)*)")


def sections() -> set[int]:
    text = (ROOT / "docs" / "SHIQ_MATH.md").read_text(encoding="utf-8")
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, flags=re.M)}


def test_every_cited_section_exists():
    have = sections()
    assert have == set(range(1, max(have) + 1))
    missing = []
    for package in ("shiq_train", "shiq_eval", "shiq_data"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for match in CITATION.finditer(path.read_text(encoding="utf-8")):
                for n in re.findall(r"§(\d+)", match.group(1)):
                    if int(n) not in have:
                        missing.append(f"{path.relative_to(ROOT)}: {match.group(0)}")
    assert not missing, missing
