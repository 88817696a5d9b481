"""docs/reliability.md names only tests that exist: a promise without its proof is a broken link."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "reliability.md"


def test_every_test_the_doc_names_exists():
    text = DOC.read_text(encoding="utf-8")
    ids = re.findall(r"`(tests/[^`:]+\.py)(?:::(\w+))?`", text)
    assert len(ids) > 20
    for path, name in ids:
        source = REPO / path
        assert source.is_file(), path
        defined = re.search(rf"^(async )?def {name}\(", source.read_text(encoding="utf-8"), re.M)
        assert not name or defined, f"{path}::{name}"
