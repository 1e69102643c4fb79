"""The CPU demo end to end at reduced size: SFT -> sample -> score -> CoPG through the trainer -> eval."""

import dataclasses
import json

import pytest

from copg_jax.experiments import demo, paper


def test_sort_reward_closed_form():
    prompts = ["3 1 2 =", "3 1 2 =", "3 1 2 =", "5 5 1 ="]
    assert demo.sort_reward(prompts, ["1 2 3", "1 3 2", "1 2", "1 5 5 5"]) == [1.0, 1 / 3, 2 / 3, 3 / 4]
    with pytest.raises(ValueError, match="not a sorting prompt"):
        demo.sort_reward(["hello"], ["1"])


@pytest.mark.slow
def test_quick_demo_improves_reward_with_copg(tmp_path):
    settings = dataclasses.replace(demo.QUICK, betas={"copg": (0.2,)})
    results = demo.run(tmp_path, settings)
    for name in (
        "results.json",
        "results.md",
        "reward_vs_kl.png",
        "data/train.jsonl",
        "reference/config.json",
    ):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "results.json").read_text())["results"]
    assert saved == results
    ref = next(r for r in results if r["method"] == "reference")
    copg = next(r for r in results if r["method"] == "copg")
    assert abs(ref["kl"]) < 1e-4  # the reference against itself
    assert copg["kl"] > 0
    assert copg["reward"] > ref["reward"] + 2 * ref["reward_stderr"], (copg, ref)
    assert "| copg | 0.2 |" in (tmp_path / "results.md").read_text()


def test_a_rerun_replaces_an_earlier_experiments_folder_and_nothing_else(tmp_path, capsys):
    """A second `copg demo` into its folder failed 17 s in (its runs refused to start over), the data
    already rewritten under the earlier results: an experiment's folder is now replaced whole; a folder of
    anything else is refused, untouched."""
    out = tmp_path / "demo"
    demo.start_output_folder(out, "demo")
    (out / "data").mkdir()
    (out / "data" / "train.jsonl").write_text("{}\n")
    demo.start_output_folder(out, "demo")
    assert [p.name for p in out.iterdir()] == [demo.OUTPUT_MARK]
    assert f"copg demo: replacing the earlier results in {out}" in capsys.readouterr().out
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--out", str(other), "--quick"])
    assert exit_.value.code == 2 and "holds no earlier experiment" in capsys.readouterr().err
    for main in (demo.main, paper.main):  # one command line for both experiments, checked before any work
        for args, error in (
            (["--out", str(other)], "holds no earlier experiment"),
            (["--seed", "-1"], "--seed must be in [0, 4294967293]"),
        ):
            with pytest.raises(SystemExit) as exit_:
                main([*args, "--quick"])
            assert exit_.value.code == 2 and error in capsys.readouterr().err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]
    link = tmp_path / "latest"  # --out a link to the folder: its contents replaced, the link kept
    link.symlink_to(out)
    (out / "old.json").write_text("{}")
    demo.start_output_folder(link, "demo")
    assert link.is_symlink() and [p.name for p in out.iterdir()] == [demo.OUTPUT_MARK]
    # a finished experiment listed what it wrote: a file of the user's put there since is refused, not lost
    (out / "results.md").write_text("|")
    demo.finish_output_folder(out, "demo")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(
        ValueError, match=r"holds \['notes.txt'\], which the earlier experiment did not write"
    ):
        demo.start_output_folder(out, "demo")
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    demo.start_output_folder(out, "demo")
    assert [p.name for p in out.iterdir()] == [demo.OUTPUT_MARK]
