"""bench.instructions reads callgrind's dumps and reports per request and per token."""

from pathlib import Path

from bench.instructions import markdown, totals


def test_totals_reads_the_dump_count_not_the_empty_summary(tmp_path: Path) -> None:
    dump = tmp_path / "frontend.cg.2"
    # As callgrind writes a dump asked for by callgrind_control: the summary of a dump
    # taken while counting was off is 0, its totals line the instructions counted.
    dump.write_text(
        "# callgrind format\nversion: 1\ncreator: callgrind-3.19.0\npid: 4242\n"
        "cmd:  python -m supervisor run\npart: 2\n\ndesc: Trigger: Client Request: ns\n"
        "events: Ir\nsummary: 0\n\nfl=(1) x.c\nfn=(1) f\n0 55004388\n\ntotals: 55004388\n"
    )
    assert totals(dump) == 55004388
    (tmp_path / "empty").write_text("events: Ir\nsummary: 0\ntotals: 0\n")
    assert totals(tmp_path / "empty") == 0


def test_markdown_puts_the_frontend_over_each_router_and_says_what_was_skipped() -> None:
    paths = {
        "frontend": {"per_request": 138_000, "per_token": 26_000, "errors": 0},
        "vllm-router": {"per_request": 172_500, "per_token": 7_800, "errors": 0},
    }
    routers = {"vllm-router": "vllm-router==0.1.17", "sglang-router": "skipped: no network"}
    text = markdown({"paths": paths, "routers": routers, "requests": 400, "tokens": 2000})
    assert "| frontend | 138,000 | 26,000 |" in text
    assert "vllm-router 0.80x per request, 3.33x per token" in text
    assert "sglang-router: skipped: no network." in text
