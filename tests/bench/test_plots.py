"""bench/run_all.py's charts, drawn from small rows shaped like the committed `bench/*.json`: the x ticks name each
row's variant and size (never a placeholder), the y axis and title say which ratio is plotted and which way is
better, every bar carries its value, and the legend sits outside the axes."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import pytest  # noqa: E402

from bench import run_all  # noqa: E402

LOSS_KERNELS = [
    {
        "bench": "loss_kernels",
        "group": "kd",
        "variant": v,
        "batch": 1,
        "seq": 2048,
        "vocab": 49152,
        "dtype": "float32",
        "time_s_median": t,
        "time_ratio_vs_naive": tr,
        "mem_ratio_vs_naive": mr,
        "threads": 1,
    }
    for v, t, tr, mr in (("kd_naive", 2.0, 1.0, 1.0), ("kd_chunked", 1.4, 0.72, 0.23))
] + [
    {
        "bench": "loss_kernels",
        "group": "aligndistil",
        "variant": "aligndistil_chunked",
        "batch": 1,
        "seq": 1024,
        "vocab": 49152,
        "dtype": "float32",
        "time_ratio_vs_naive": 0.39,
        "mem_ratio_vs_naive": 0.26,
        "threads": 1,
    }
]
STEPS = (("sft", "sft", 1.0), ("sft_rollout", "sft", 1.43), ("dckd", "sft", 1.02), ("adpa", "sft_rollout", 0.92))
DISTILL_STEP = [
    {"bench": "distill_step", "method": m, "student": s, "median_s": 0.03, "baseline": b, "ratio_vs_sft": r}
    for s in ("tiny", "small")
    for m, b, r in STEPS
]
GENERATION = [
    {"bench": "generate", "model": "tiny", "ours_tokens_per_s": 5012.1, "ratio": 1.08, "threads": 1},
    {"bench": "signals", "model": "tiny", "ratio_vs_forward": 0.692, "ratio_vs_forward_topk": 0.79, "threads": 1},
    {"bench": "cache", "model": "tiny", "bytes_per_token_teacher": 205.9, "threads": 1},  # no ratio: not plotted
    {"bench": "generate", "model": "small", "ours_tokens_per_s": 454.6, "ratio": 0.988, "threads": 1},
]


def _bar_values(ax) -> list[float]:
    return [bar.get_height() for container in ax.containers for bar in container]


def _value_labels(ax) -> list[str]:
    return [text.get_text() for text in ax.texts if text.get_text()]


@pytest.mark.parametrize(
    "name, rows, ticks, words",
    [
        (
            "loss_kernels",
            LOSS_KERNELS,
            ["kd · kd_naive · seq 2048", "kd · kd_chunked · seq 2048", "aligndistil · aligndistil_chunked · seq 1024"],
            ["time", "memory", "naive", "lower is better"],
        ),
        (
            "distill_step",
            DISTILL_STEP,
            ["sft · tiny", "sft_rollout · tiny\n(vs sft)", "dckd · tiny\n(vs sft)", "adpa · tiny\n(vs sft_rollout)"]
            + [
                "sft · small",
                "sft_rollout · small\n(vs sft)",
                "dckd · small\n(vs sft)",
                "adpa · small\n(vs sft_rollout)",
            ],
            ["step-time ratio", "TRL", "lower is better"],
        ),
        (
            "generation",
            GENERATION,
            ["generate · tiny", "signals · tiny", "generate · small"],
            ["throughput ratio", "higher is better"],
        ),
    ],
)
def test_bench_chart_names_rows_ratio_and_values(name, rows, ticks, words):
    fig = run_all.figure(name, rows)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ticks
    assert not any(t.get_text() in ("", "row", "?") for t in ax.get_xticklabels())
    ylabel, title = ax.get_ylabel(), ax.get_title()
    assert "ratio" in ylabel and "ratio" in title and title.startswith(f"{name}: ")
    for word in words:
        assert word in ylabel + " " + title
    expected = [v for row in rows for k, v in row.items() if "ratio" in k]
    assert sorted(_bar_values(ax)) == pytest.approx(sorted(expected))  # no zero-height bar for a missing ratio
    assert sorted(_value_labels(ax)) == sorted(f"{v:.2f}" for v in expected)
    legend = ax.get_legend()
    assert legend.get_bbox_to_anchor().x0 >= ax.get_window_extent().x1  # outside the axes, over no bar
    assert "1.0 = baseline" in [t.get_text() for t in legend.get_texts()]


def test_shared_identity_goes_under_the_title_and_rows_without_a_ratio_draw_nothing():
    rows = [
        {"bench": "aligndistil_step", "variant": v, "seq": 1024, "vocab": 49152, "time_ratio_vs_naive": r}
        for v, r in (("naive", 1.0), ("chunked", 0.85))
    ]
    ax = run_all.figure("aligndistil_step", rows).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["naive", "chunked"]
    assert ax.get_xlabel() == "variant" and "seq 1024 · vocab 49152" in ax.get_title()
    assert run_all.figure("generation", [{"bench": "cache", "model": "tiny", "bytes": 3.0}]) is None


def test_plot_only_redraws_from_the_json_without_running_a_benchmark(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "OUT", tmp_path)
    (tmp_path / "distill_step.json").write_text(__import__("json").dumps(DISTILL_STEP))
    monkeypatch.setattr(run_all.importlib, "import_module", lambda name: pytest.fail(f"ran {name}"))
    assert run_all.main(["--plot-only", "--only", "distill_step", "loss_kernels"]) == 0
    assert (tmp_path / "distill_step.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "loss_kernels.png").exists() and not (tmp_path / "results.md").exists()


def test_plot_only_reads_the_rows_of_a_config_versions_rows_json(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "OUT", tmp_path)
    rows = [{**GENERATION[1], "bench": "signals", "model": m, "ratio_vs_forward": r} for m, r in (("tiny", 0.9),)]
    document = {"config": {"models": "tiny"}, "versions": {"torch": "x"}, "rows": rows}
    (tmp_path / "signals_throughput.json").write_text(__import__("json").dumps(document))
    assert "signals_throughput" in run_all.BENCHMARKS and "fused_losses" in run_all.BENCHMARKS
    assert run_all.main(["--plot-only", "--only", "signals_throughput"]) == 0
    assert (tmp_path / "signals_throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert run_all.rows_of(document) == rows and run_all.rows_of(rows) == rows
    # a run writes that shape back for these benchmarks, and the row list for the older ones
    assert run_all.document("signals_throughput", rows, full=False)["rows"] == rows
    assert run_all.document("distill_step", DISTILL_STEP, full=False) == DISTILL_STEP


def test_fused_losses_is_drawn_by_its_own_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(run_all, "OUT", tmp_path)
    rows = [
        {"variant": v, "dtype": "float32", "vocab": 49152, "seq": 2048, "time_ratio_vs_trl": t, "mem_ratio_vs_trl": m}
        for v, t, m in (("trl", 1.0, 1.0), ("fused", 0.8, 0.06))
    ]
    drawn = []
    original = run_all.plot
    monkeypatch.setattr(run_all, "plot", lambda name, rows: drawn.append(rows) or original(name, rows))
    path = run_all.draw("fused_losses", [{**r, "grad_ratio": 50.0} for r in rows])
    assert path == tmp_path / "fused_losses.png" and path.read_bytes()[:4] == b"\x89PNG"
    # bench.fused_losses.plot hands over its ratios vs TRL only, labelled by variant + dtype and size
    assert drawn == [
        [
            {"variant": f"{r['variant']} float32", "size": "V=49152 T=2048", **{k: r[k] for k in list(r)[-2:]}}
            for r in rows
        ]
    ]
