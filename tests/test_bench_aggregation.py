"""The scripts that make every headline number (bench/plot_experts.py, arms.py, choose_on_validation.py, interference.py,
selection.py, policies.py, idle_share.py),
on a small synthetic result set whose answers are known."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import arms  # noqa: E402
import choose_on_validation  # noqa: E402
import idle_share  # noqa: E402
import interference  # noqa: E402
import plot_experts  # noqa: E402
import selection  # noqa: E402

RECORDS = 40


def arm(per_record: np.ndarray, validation: float, used: dict, experts: dict | None = None, steps: int = 100) -> dict:
    result = {
        "by_label": {
            "a": {"nll": float(per_record[: RECORDS // 2].mean()), "n": RECORDS // 2},
            "overall": {"nll": float(per_record.mean()), "n": RECORDS},
        },
        "per_record_nll": per_record.tolist(),
        "adapters_used": used,
        "validation_nll": validation,
        "compute": {
            "steps": steps,
            "tokens": 10 * steps,
            "train_seconds": steps / 10,
            "steps_with_generalist": 2 * steps,
            "tokens_with_generalist": 20 * steps,
            "train_seconds_with_generalist": steps / 5,
            "gradient_pass_seconds": 7.0,
        },
    }
    if experts is not None:
        result["experts"], result["fallback"] = experts, [g for g, e in experts.items() if e["lambda"] == 0]
    return result


def expert(weight: float, initial: float = 1.0, best: float = 0.9) -> dict:
    return {
        "lambda": weight,
        "kept": weight > 0,
        "initial_eval_loss": initial,
        "best_eval_loss": best,
        "validation_samples": 10,
    }


def synthetic_results(folder: Path) -> None:
    """Three seeds; routed is exactly single − 0.1 − 0.01·seed on every record; single-continued wins validation in seed 1 only."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for seed in range(3):
        single = 1.0 + rng.normal(0, 0.2, RECORDS)
        continued = single - 0.05
        routed = single - 0.1 - 0.01 * seed
        result = {
            "dataset": "toy",
            "per_label": 10,
            "seed": seed,
            "arms": {
                "single": arm(single, 1.00, {"single__0": RECORDS}),
                "single-continued": arm(
                    continued, 0.99 if seed == 1 else 1.01, {"single-continued__0": RECORDS}, {"0": expert(1.0)}
                ),
                "routed": arm(
                    routed,
                    0.9,
                    {"single__0": 10, "routed__0": 30},
                    {"0": expert(1.0), "1": expert(0.5), "2": expert(0.0)},
                ),
                "random-clusters": arm(
                    single - 0.02,
                    0.95,
                    {"single__0": 20, "random-clusters__0": 20},
                    {"0": expert(1.0), "1": expert(0.0)},
                ),
            },
        }
        (folder / f"toy-10-seed{seed}.json").write_text(json.dumps(result))


@pytest.fixture
def results(tmp_path):
    synthetic_results(tmp_path / "results")
    return tmp_path / "results"


def test_the_best_single_adapter_is_chosen_on_validation_and_routed_is_compared_with_it(results):
    summary = arms.summarize("toy", 10, plot_experts.load(results)[("toy", 10)])
    assert summary["arms"]["best-single"]["chosen"] == ["single", "single-continued", "single"]
    by_pair = {(c["arm"], c["baseline"]): c for c in summary["comparisons"]}
    # routed − best single: −0.1 − 0.01·seed against single, +0.05 back where single-continued was chosen (seed 1)
    assert by_pair[("routed", "best-single")]["per_seed"] == pytest.approx([-0.10, -0.06, -0.12])
    assert by_pair[("routed", "single")]["mean"] == pytest.approx(-0.11)
    assert by_pair[("routed", "random-clusters")]["mean"] == pytest.approx(-0.09)
    low, high = by_pair[("routed", "single")]["t_interval_over_seeds"]
    assert low < -0.11 < high and high < 0  # three seeds of −0.10, −0.11, −0.12
    # the differences are constant over records, so both bootstraps collapse onto the seed spread
    assert by_pair[("routed", "single")]["record_bootstrap"] == pytest.approx((-0.11, -0.11))
    two_low, two_high = by_pair[("routed", "single")]["seed_and_record_bootstrap"]
    assert -0.12 - 1e-9 <= two_low < two_high <= -0.10 + 1e-9
    assert summary["arms"]["routed"]["kept_blended_fell_back"] == [(1, 1, 1)] * 3
    assert summary["arms"]["routed"]["generalist_share"] == [0.25] * 3
    assert summary["arms"]["routed"]["steps"] == 200
    assert (
        "routed-falling-back-to-best-single",
        "best-single",
    ) not in by_pair  # no result says which adapter served each record


def test_the_fall_back_what_if_re_serves_only_the_generalists_records_by_the_single_adapter_of_record(tmp_path):
    synthetic_results(tmp_path / "results")
    path = tmp_path / "results" / "toy-10-seed1.json"  # single-continued is the adapter of record here
    result = json.loads(path.read_text())
    result["arms"]["routed"]["per_record_adapter"] = ["single__0"] * 10 + ["routed__0"] * 30
    path.write_text(json.dumps(result))
    summary = arms.summarize("toy", 10, plot_experts.load(tmp_path / "results")[("toy", 10)])
    what_if = next(c for c in summary["comparisons"] if c["arm"] == "routed-falling-back-to-best-single")
    # 10 records now served as best single is (difference 0), 30 still by routed: (single − 0.11) − (single − 0.05)
    assert what_if["seeds"] == 1 and what_if["per_seed"] == pytest.approx([-0.06 * 30 / 40])
    assert "routed-falling-back-to-best-single" not in summary["arms"]  # an estimate, not an arm with its own table row


def test_arms_and_plot_experts_write_their_tables(results, tmp_path):
    for script in ("arms.py", "plot_experts.py"):
        subprocess.run(
            [sys.executable, str(BENCH / script), "--results", str(results), "--out", str(tmp_path)],
            check=True,
            capture_output=True,
        )
    table = (tmp_path / "arms.md").read_text()
    assert "routed − best-single (3 seed(s)): **-0.0933**" in table
    assert json.loads((tmp_path / "arms.json").read_text())[0]["seeds"] == [0, 1, 2]
    old = (tmp_path / "experts.md").read_text()
    assert "routed − single" in old and "**-0.1100**" in old and (tmp_path / "experts_curve.png").stat().st_size > 0


def test_plot_experts_pools_seeds_per_record():
    differences = np.array([-0.2, 0.0, -0.1])
    mean, low, high = plot_experts.paired_bootstrap(differences)
    assert mean == pytest.approx(-0.1) and low < mean < high
    assert plot_experts.mean_std([1.0, 3.0]) == "2.0000 ± 1.4142"


def test_choose_on_validation_scores_kept_experts_by_their_best_loss_and_dropped_ones_by_the_generalist():
    routed = {
        "experts": {
            "0": {"kept": True, "best_eval_loss": 0.5, "initial_eval_loss": 1.0, "validation_samples": 1},
            "1": {"kept": False, "best_eval_loss": 0.1, "initial_eval_loss": 2.0, "validation_samples": 3},
        }
    }
    assert choose_on_validation.routed_validation_nll(routed) == pytest.approx((0.5 + 3 * 2.0) / 4)


def test_interference_rows_and_rank_correlation():
    manifest = {
        "experts": {
            "routed": {
                "experts": {str(c): {"initial_eval_loss": 1.0, "best_eval_loss": 1.0 - c / 100} for c in range(6)}
            }
        },
        "stages": {
            "cluster": {
                "interference": {
                    str(c): {"size": 10, "mean_cosine": 1 - c / 10, "outside_energy": c / 10} for c in range(6)
                }
            },
            "keep/routed": {
                "groups": {str(c): {"generalist_nll": 1.0, "candidate_nll": {"1.0": 1.0 - c / 50}} for c in range(5)}
            },
        },
    }
    rows = interference.clusters(manifest, "toy")
    assert [r["gain_own_share"] for r in rows] == pytest.approx([c / 100 for c in range(6)])
    assert rows[5]["gain_routed"] is None  # no keep decision for that cluster
    assert {r["strategy"] for r in rows} == {"routed"}  # without the run directory, only the cluster stage's statistics
    result = interference.analyse(rows, samples=200)["all"]
    assert result["gain_own_share"]["outside_energy"]["rho"] == pytest.approx(1.0)
    assert result["gain_own_share"]["mean_cosine"]["rho"] == pytest.approx(-1.0)
    assert result["gain_routed"]["outside_energy"]["clusters"] == 5
    assert result["gain_routed"]["outside_energy"]["interval_over_runs"] is None  # one run: nothing to resample


def test_interference_of_the_other_partitions_comes_from_the_same_sketch_in_record_order(tmp_path):
    import torch
    from safetensors.torch import save_file

    from gradientspace.clustering.kmeans import interference as statistics

    generator = torch.Generator().manual_seed(0)
    coordinates = torch.randn(12, 5, generator=generator)
    ids = [f"r{i}" for i in range(12)]
    save_file({"coordinates": coordinates}, str(tmp_path / "sketch.safetensors"))
    (tmp_path / "clusters.jsonl").write_text(
        "".join(json.dumps({"id": i, "cluster": n % 2}) + "\n" for n, i in enumerate(ids))
    )
    oracle = [n // 4 for n in range(12)]  # three labels, in record order
    folder = tmp_path / "strategies" / "oracle"
    folder.mkdir(parents=True)
    # the assignment is keyed by id, in another order than the sketch's rows
    (folder / "partition.json").write_text(
        json.dumps(
            {
                "groups": ["code", "math", "writing"],
                "assignment": {i: oracle[n] for n, i in reversed(list(enumerate(ids)))},
            }
        )
    )
    manifest = {
        "experts": {
            "oracle": {
                "experts": {g: {"initial_eval_loss": 1.0, "best_eval_loss": 0.9} for g in ("code", "math", "writing")}
            }
        },
        "stages": {"cluster": {"interference": statistics(coordinates, [n % 2 for n in range(12)])}},
    }
    rows = interference.clusters(manifest, "toy", tmp_path)
    assert [(r["strategy"], r["cluster"]) for r in rows] == [
        ("routed", "0"),
        ("routed", "1"),
        ("oracle", "code"),
        ("oracle", "math"),
        ("oracle", "writing"),
    ]
    expected = statistics(coordinates, oracle)
    for number, name in enumerate(("code", "math", "writing")):
        row = next(r for r in rows if r["cluster"] == name)
        assert row["mean_cosine"] == pytest.approx(expected[str(number)]["mean_cosine"])
        assert row["outside_energy"] == pytest.approx(expected[str(number)]["outside_energy"])
        assert row["gain_own_share"] == pytest.approx(0.1)


def test_interference_pools_stored_runs_labelled_by_their_file(tmp_path):
    names = [f"interference-{n}" for n in range(5)]
    for number, name in enumerate(names):
        rows = [
            {
                "run": "run",
                "cluster": str(c),
                "size": 10,
                "mean_cosine": number / 2 + c / 10,
                "outside_energy": 1 - c / 10,
                "gain_own_share": c / 100,
                "gain_routed": None,
            }
            for c in range(3)
        ]
        (tmp_path / f"{name}.json").write_text(json.dumps({"clusters": rows}))
    pooled = [row for name in names for row in interference.rows_of(tmp_path / f"{name}.json")]
    assert [r["run"] for r in pooled] == [f"{name}/run" for name in names for _ in range(3)]
    assert {r["strategy"] for r in pooled} == {"routed"}  # files stored before other partitions were measured
    result = interference.analyse(pooled, samples=200)["all"]
    energy = result["gain_own_share"]["outside_energy"]
    assert energy["clusters"] == 15 and energy["runs"] == 5 and "gain_routed" not in result
    assert energy["rho"] == pytest.approx(-1.0) and energy["interval_over_runs"] == pytest.approx([-1.0, -1.0])
    two_runs = interference.analyse(pooled[:6], samples=200)["all"]["gain_own_share"]["outside_energy"]
    assert two_runs["interval_over_runs"] is None and two_runs["interval"] is not None


def selection_run(
    seed: int, cosines: list[float], weights: list[float], adapters: list[str] | None = None
) -> tuple[dict, list[dict]]:
    """One run of four gradient clusters for bench/selection.py: its result and its clusters' interference rows."""
    routed = {
        "by_label": {"overall": {"nll": 1.0}},
        "per_record_nll": [1.0, 1.0, 1.0, 1.0],
        "experts": {str(c): {"lambda": w, "steps": 10 * (c + 1)} for c, w in enumerate(weights)},
    }
    if adapters is not None:
        routed["per_record_adapter"] = adapters
    result = {
        "dataset": "toy",
        "per_label": 10,
        "seed": seed,
        "arms": {"routed": routed, "single": {"per_record_nll": [2.0, 2.0, 2.0, 2.0]}},
    }
    return result, [{"cluster": str(c), "mean_cosine": cosine, "size": 5} for c, cosine in enumerate(cosines)]


def test_selection_chooses_the_largest_share_that_skipped_no_kept_expert_and_says_what_it_saves():
    # seed 0: the highest-cosine cluster (3) fell back, the second (2) was kept; seed 1 likewise, by other numbers
    # seed 2: its highest-cosine cluster (0) was kept, blended, and the result says which adapter served each record
    runs = [
        selection_run(0, [0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 1.0, 0.0]),
        selection_run(1, [0.4, 0.3, 0.2, 0.1], [0.0, 1.0, 0.0, 0.0]),
        selection_run(
            2, [0.9, 0.1, 0.2, 0.3], [0.5, 0.0, 0.0, 0.0], ["routed__0", "single__0", "routed__0", "single__0"]
        ),
    ]
    analysis = selection.analyse(
        [r for r, _ in runs], {f"toy-10-seed{seed}": rows for seed, (_, rows) in enumerate(runs)}
    )
    quarter, half = analysis["by_share"][0], analysis["by_share"][1]
    assert (quarter["kept_experts_skipped"], quarter["kept_experts"]) == (1, 4)  # seed 2's blended expert
    assert quarter["expert_steps_saved"] == 40 + 10 + 10 and half["kept_experts_skipped"] == 3  # one per run
    # at random, a quarter (one cluster of four) misses the kept ones with probability 2/4 · 3/4 · 3/4
    assert quarter["chance_of_skipping_no_kept_expert"] == pytest.approx(0.5 * 0.75 * 0.75)
    assert analysis["chosen_share"] is None  # even a quarter skipped a kept expert
    held_out = analysis["leave_one_run_out"]
    assert held_out["toy-10-seed2"]["share_chosen_on_the_others"] == 0.25  # seeds 0 and 1 lost nothing at a quarter
    assert held_out["toy-10-seed2"]["skipped"] == ["0"] and held_out["toy-10-seed2"]["kept_experts_skipped"] == 1
    # its two records served by the skipped expert go to the generalist (2.0), the others keep routed's own NLL
    assert held_out["toy-10-seed2"]["routed_test_nll_with_skips"] == pytest.approx(1.5)
    assert held_out["toy-10-seed0"]["share_chosen_on_the_others"] is None and held_out["toy-10-seed0"]["skipped"] == []


def test_selection_what_if_is_routed_itself_when_every_skipped_expert_had_fallen_back_and_unknown_otherwise():
    fell_back, rows = selection_run(0, [0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 1.0, 0.0])
    clusters = selection.clusters_of(fell_back, rows)
    assert [row["cluster"] for row in clusters] == ["3", "2", "1", "0"]
    assert selection.what_if_test_nll(fell_back, selection.skipped(clusters, 0.25)) == 1.0
    assert (
        selection.what_if_test_nll(fell_back, selection.skipped(clusters, 0.5)) is None
    )  # cluster 2 was kept: needs per_record_adapter


def synthetic_scores(folder: Path, records: int, seed: int) -> None:
    """Matrices where a prompt feature decides the best adapter: side A of the feature space is served best by expert
    column 1, side B by expert column 2; the fall-back (column 0) is second best everywhere, column 3 a dropped expert."""
    rng = np.random.default_rng(seed)
    side = rng.integers(0, 2, records)
    features = rng.normal(size=(records, 8)) + 3.0 * np.outer(side * 2 - 1, np.eye(8)[0])
    nll = 1.0 + 0.01 * rng.normal(size=(records, 4))
    nll[side == 0, 1] -= 0.2
    nll[side == 1, 2] -= 0.2
    nll[:, 1:3] += 0.1  # each expert is worse than the fall-back off its own side
    nll[:, 3] += 0.5
    folder.mkdir(parents=True)
    np.save(folder / "nll.npy", nll)
    np.save(folder / "hidden.npy", features.astype(np.float32))
    np.save(folder / "embedding.npy", (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32))
    (folder / "info.json").write_text(
        json.dumps(
            {
                "ids": [f"r{i}" for i in range(records)],
                "fallback": {"routed": 0},
                "group_columns": {"routed": [1, 2, 0]},
                "trained_columns": {"routed": [1, 2, 3]},
                "served": {"routed": [0] * records},
            }
        )
    )


def test_routing_policies_learn_on_validation_what_the_router_missed(tmp_path):
    """A router that always fell back scores the fall-back; a policy that reads the deciding feature finds each side's expert
    (most of the way to the per-record oracle); the oracle is the floor; the dropped expert is never worth picking."""
    for seed in (1, 2):
        result = tmp_path / f"skills4-200-seed{seed}.json"
        result.write_text(json.dumps({"dataset": "skills4", "per_label": 200, "seed": seed}))
        for split, records in (("validation", 60), ("test", 80)):
            synthetic_scores(tmp_path / f"skills4-200-seed{seed}-scores" / split, records, seed * 10 + records)
    subprocess.run(
        [sys.executable, str(BENCH / "policies.py"), "--results", str(tmp_path), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        cwd=BENCH,
    )
    summary = json.loads((tmp_path / "policies.json").read_text())
    for candidates in ("served", "trained"):
        rows = summary[f"skills4-200-{candidates}"]["policies"]
        assert rows["router"]["minus_fallback"] == 0 and rows["router"]["share_fallback"] == 1
        for learned in ("logistic-hidden", "knn-embedding"):
            assert rows[learned]["minus_fallback"] < 0.8 * rows["oracle"]["minus_fallback"] < 0, (candidates, learned)
            assert rows[learned]["t_interval_over_seeds"][1] < 0
        assert all(rows["oracle"]["test_nll"] <= row["test_nll"] + 1e-12 for row in rows.values())
    assert "nearest-centroid" not in rows  # no sketch coordinates in these matrices


def test_the_confirmatory_verdicts_follow_the_pre_registered_rules(tmp_path):
    """skills4 complete: routed beats the best single (chosen on validation) and both other partitions by a margin far beyond
    the noise: H1 and H2 confirmed. mix4 has one seed missing and one run made by other code: H3 pending, the run left out."""
    folder = tmp_path / "confirmatory"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for dataset, per_label, seeds in (("skills4", 200, range(5, 11)), ("mix4", 100, (5, 6))):
        for seed in seeds:
            single = 1.0 + rng.normal(0, 0.2, RECORDS)
            continued = single - 0.02  # and better on validation: the single adapter of record
            noise = rng.normal(0, 0.002, RECORDS)
            result = {
                "dataset": dataset,
                "per_label": per_label,
                "seed": seed,
                "code": "other" if seed == 6 and dataset == "mix4" else "abc",
                "stage_seconds": {"gradients": 100.0, "scores/validation": 5.0, "scores/test": 5.0},
                "arms": {
                    "single": arm(single, 1.00, {"single__0": RECORDS}),
                    "single-continued": arm(continued, 0.98, {"single-continued__0": RECORDS}, {"0": expert(1.0)}),
                    "routed": arm(
                        continued - 0.05 + noise, 0.9, {"single-continued__0": 10, "routed__0": 30}, {"0": expert(1.0)}
                    ),
                    "embedding-clusters": arm(
                        continued - 0.01 + noise, 0.95, {"single-continued__0": 40}, {"0": expert(0.0)}
                    ),
                    "projection-clusters": arm(
                        continued + noise, 0.97, {"single-continued__0": 40}, {"0": expert(0.0)}
                    ),
                },
            }
            (folder / f"{dataset}-{per_label}-seed{seed}.json").write_text(json.dumps(result))
    done = subprocess.run(
        [
            sys.executable,
            str(BENCH / "confirmatory.py"),
            "--results",
            str(folder),
            "--out",
            str(tmp_path),
            "--commit",
            "abc",
        ],
        capture_output=True,
        text=True,
        cwd=BENCH,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "confirmatory.json").read_text())
    verdicts = {name: h["verdict"] for name, h in report["hypotheses"].items()}
    assert verdicts == {"H1": "confirmed", "H2": "confirmed", "H3": "pending"}
    h1 = report["hypotheses"]["H1"]["comparisons"][0]
    assert h1["seeds"] == 6 and h1["mean"] == pytest.approx(-0.05, abs=0.002) and h1["t_interval_over_seeds"][1] < 0
    assert report["runs"]["skills4-200"]["best_single"] == {str(s): "single-continued" for s in range(5, 11)}
    assert report["runs"]["mix4-100"]["not_from_the_protocol_commit"] == {"6": "other"} and report["runs"]["mix4-100"][
        "present"
    ] == [5]
    assert report["runs"]["skills4-200"]["scoring_cost"]["5"] == pytest.approx(0.1)
    assert "**not from the protocol's commit** (left out)" in (tmp_path / "confirmatory.md").read_text()


def test_idle_share_splits_a_strategys_one_keep_stage_over_its_groups_by_their_validation_records():
    """A run made before the keep decisions were dealt per group: each group's share of its strategy's keep seconds is its
    share of the validation records decided on (evenly where none were); a run recorded per group is left as it is."""
    decided = lambda *counts: {"groups": {str(g): {"validation_records": n} for g, n in enumerate(counts)}}
    stages = {"router/routed": {}, "keep/routed": decided(3, 0, 1), "keep/oracle": decided(0, 0), "report": {}}
    seconds = {"router/routed": 8.0, "keep/routed": 20.0, "keep/oracle": 4.0, "report": 1.0}
    assert idle_share.keep_per_group(stages, seconds) == {
        "router/routed": 8.0,
        "keep/routed/0": 15.0,
        "keep/routed/1": 0.0,
        "keep/routed/2": 5.0,
        "keep/oracle/0": 2.0,
        "keep/oracle/1": 2.0,
        "report": 1.0,
    }
    recorded = {"keep/routed/0": 15.0, "keep/routed/1": 5.0, "keep/routed": 0.1}
    assert idle_share.keep_per_group({}, recorded) == recorded


def test_idle_share_counts_a_recorded_stage_as_the_code_that_ran_it_placed_it():
    """The replayed runs were made before issue 33 on 2 processes: the gradient pass was shared (its seconds are half of
    one process's), the generalist trained on rank 0 alone and single-continued on one rank (their own seconds)."""
    stages = {"gradients": 100.0, "experts/single/0": 50.0, "experts/single-continued/0": 30.0, "keep/routed": 5.0}
    recorded = {name: {"seconds": seconds, "done": True} for name, seconds in stages.items()}
    assert idle_share.one_process_seconds(recorded, 2) == {**stages, "gradients": 200.0}


def test_idle_share_replays_stage_times_on_the_ranks_as_the_runner_places_them():
    """One-process seconds: a MAIN stage holds rank 0 while 7 wait, EVERY is shared by all 8, SPREAD siblings are dealt
    the longest first to the least-loaded rank (the others' keep decisions, group by group, after the fall-back's, whose
    one group is EVERY's);
    before issue 33 the warm-up, the generalist, the routers, the keep decisions and the thresholds ran on rank 0, and
    single-continued was dealt."""
    seconds = {"warmup": 80.0, "gradients": 800.0, "experts/single/0": 160.0, "experts/single-continued/0": 240.0}
    seconds |= {f"experts/routed/{g}": 10.0 * (g + 1) for g in range(9)}  # 10 … 90: dealt over 8 ranks
    seconds |= {"router/routed": 8.0, "router/embedding-clusters": 9.0}
    seconds |= {"keep/single-continued/0": 30.0, "keep/routed/0": 12.0, "keep/routed/1": 8.0}
    seconds |= {"keep/embedding-clusters/0": 15.0, "keep/embedding-clusters/1": 10.0, "report": 1.0}
    now = idle_share.replay(seconds, idle_share.placement_now, 8)
    before = idle_share.replay(seconds, idle_share.placement_before, 8)
    # now: 10 + 100 + 20 + 30 (EVERY) + 90 (the longest expert; 10 joins the rank that has 20) + 9 (the routers dealt)
    # + 3.75 (the fall-back's keep decision, its records shared by all 8) + 15 (the other four groups dealt) + 1
    assert now["wall_seconds"] == 278.8
    # before: single-continued dealt with the experts, alone on its rank for 240 while the others take the nine
    assert before["wall_seconds"] == 80 + 100 + 160 + 240 + 8 + 9 + 30 + 20 + 25 + 1
    busy = sum(seconds.values())
    assert before["idle_share"] == round(1 - busy / (8 * 673.0), 3) and now["idle_share"] < before["idle_share"]
