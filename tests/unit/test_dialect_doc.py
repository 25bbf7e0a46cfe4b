from dataclasses import fields
from pathlib import Path

from supervisor.backends import Dialect

DOC = Path(__file__).resolve().parents[2] / "docs" / "dialect.md"


def test_every_dialect_field_is_documented_in_the_code() -> None:
    undocumented = [f.name for f in fields(Dialect) if not f.metadata.get("doc")]
    assert not undocumented


def test_the_dialect_reference_is_in_step_with_the_code() -> None:
    assert DOC.read_text() == Dialect.reference_markdown(), (
        "regenerate: failover-supervisor dialect-doc > docs/dialect.md"
    )
