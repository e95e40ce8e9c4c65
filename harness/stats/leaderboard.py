"""AlpacaEval 2.0's leaderboard, replicated from annotation files.

* ``fit_joint_difficulty`` is AlpacaEval's ``notebooks/instruction_difficulty.ipynb``: one
  soft-label L1 GLM over all models' annotations with a length slope and an intercept per
  model and one parameter per instruction (treatment coding: the first instruction is 0);
  the instruction parameters are the instruction difficulty.
* ``reproduce_leaderboard`` recomputes every leaderboard column for a folder of annotations.

Offline (no hub) we cannot fetch ``instruction_difficulty.csv`` or ``df_gamed.csv``. We fit the
difficulty jointly on the annotations at hand, and stand in for the gamed-baseline rows with
pseudo rows of the same shape (no model intercept, same total weight 0.2) whose soft labels are
the joint fit's pooled length and difficulty effects: ``LengthPrior``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core.errors import ConfigError, DataError
from harness.data.alpaca_formats import read_annotations_frame
from harness.stats.winrates import (
    LengthPrior,
    fit_soft_logistic,
    length_controlled_win_rate,
    require_columns,
    std_delta_len,
    unit_preferences,
    win_rate_summary,
)

HUB_REPO = "tatsu-lab/alpaca_eval"
LEADERBOARD_COLUMNS = (
    "win_rate", "standard_error", "n_wins", "n_wins_base", "n_draws", "n_total",
    "discrete_win_rate", "avg_length", "length_controlled_winrate", "lc_standard_error",
)


# ------------------------------------------------------------------ instruction difficulty


@dataclass(frozen=True)
class JointDifficultyFit:
    """Result of the joint GLM over many models: instruction difficulty and per-model terms."""

    instruction_difficulty: pd.Series  # index: instruction position (0..N-1), like the hub csv
    instructions: tuple[str, ...]  # the instruction at each position
    length_slopes: pd.Series  # per model: weight on tanh(std_delta_len)
    intercepts: pd.Series  # per model: intercept (incl. the shared not_gamed_baseline term)
    C: float  # L1 strength chosen by cross-validation

    @property
    def length_prior(self) -> LengthPrior:
        """Pooled length effect (median over models), the offline stand-in for df_gamed."""
        return LengthPrior(length_slope=float(self.length_slopes.median()), difficulty_slope=1.0)


def instruction_order(annotations_by_model: Mapping[str, pd.DataFrame]) -> tuple[str, ...]:
    """The eval set's instruction order: the largest annotation file's, then unseen ones."""
    frames = sorted(annotations_by_model.values(), key=len, reverse=True)
    order: dict[str, None] = {}
    for frame in frames:
        require_columns(frame, ("instruction",), "annotations")
        order.update(dict.fromkeys(frame["instruction"]))
    return tuple(order)


def fit_joint_difficulty(annotations_by_model: Mapping[str, pd.DataFrame], *,
                         instructions: Sequence[str] | None = None,
                         n_splits: int = 5) -> JointDifficultyFit:
    """Fit instruction difficulty jointly over many models' annotations, as AlpacaEval did.

    GLM on soft preferences: per-model tanh(std_delta_len) slope + per-model intercept +
    one parameter per instruction (the first instruction is the reference level, 0) + a shared
    not_gamed_baseline term; L1, C cross-validated. Rows are matched to instructions by text
    (AlpacaEval's notebook used row positions). Rows with an empty output_2 or no valid
    preference are dropped, as in the notebook; models judged against themselves are skipped.
    """
    import scipy.sparse as sp

    order = tuple(instructions) if instructions is not None else instruction_order(
        annotations_by_model)
    where = {text: i for i, text in enumerate(order)}
    n_instr = len(order)
    models, blocks, prefs = [], [], []
    usable = []
    for name, frame in annotations_by_model.items():
        require_columns(frame, ("instruction", "output_1", "output_2", "preference"),
                         f"annotations of {name}")
        if {"generator_1", "generator_2"} <= set(frame.columns):
            gen1, gen2 = set(frame["generator_1"]), set(frame["generator_2"])
            if len(gen1) == 1 and gen1 == gen2:
                continue
        frame = frame.reset_index(drop=True)
        p = unit_preferences(frame)
        keep = ~np.isnan(p) & (frame["output_2"].str.len() > 0).to_numpy()
        if keep.sum() < 2:
            continue
        usable.append((name, frame[keep].reset_index(drop=True), p[keep]))
    if len(usable) < 2:
        raise DataError("the joint instruction-difficulty fit needs annotations of at least 2 "
                        "models")
    n_models = len(usable)
    for j, (name, frame, p) in enumerate(usable):
        unknown = [t for t in frame["instruction"] if t not in where]
        if unknown:
            raise DataError(f"annotations of {name}: instruction not in the instruction list: "
                            f"{unknown[0][:60]!r}")
        pos = frame["instruction"].map(where).to_numpy()
        n = len(frame)
        rows = np.arange(n)
        col = np.full(n, j)
        slope = sp.csr_matrix((np.tanh(std_delta_len(frame)), (rows, col)), shape=(n, n_models))
        intercept = sp.csr_matrix((np.ones(n), (rows, col)), shape=(n, n_models))
        nz = pos > 0  # treatment coding: position 0 is the reference level
        instr = sp.csr_matrix((np.ones(int(nz.sum())), (rows[nz], pos[nz] - 1)),
                              shape=(n, max(n_instr - 1, 0)))
        shared = sp.csr_matrix(np.ones((n, 1)))
        blocks.append(sp.hstack([slope, intercept, instr, shared]))
        prefs.append(p)
        models.append(name)
    x = sp.vstack(blocks).tocsr()
    coef, c_best = fit_soft_logistic(x, np.concatenate(prefs), None, n_splits)
    difficulty = pd.Series(np.r_[0.0, coef[2 * n_models:2 * n_models + n_instr - 1]],
                           index=pd.RangeIndex(n_instr, name="index"),
                           name="instruction_difficulty")
    return JointDifficultyFit(
        instruction_difficulty=difficulty,
        instructions=order,
        length_slopes=pd.Series(coef[:n_models], index=models, name="length_slope"),
        intercepts=pd.Series(coef[n_models:2 * n_models] + coef[-1], index=models,
                             name="intercept"),
        C=c_best,
    )


def _hub_csv(filename: str, local_files_only: bool) -> pd.DataFrame:
    """Fetch one csv of AlpacaEval's hub dataset, or raise DataError in one line."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise DataError(f"cannot fetch {filename}: huggingface_hub is not installed") from None
    try:
        path = hf_hub_download(repo_id=HUB_REPO, filename=filename, repo_type="dataset",
                               local_files_only=local_files_only)
    except Exception as e:  # offline, 404, auth, ...: all end the same way for the user
        if type(e).__name__ == "LocalEntryNotFoundError":
            reason = "the hub is unreachable (or disabled) and the file is not in the local cache"
        else:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            reason = first if len(first) <= 160 else first[:157] + "..."
        raise DataError(f"cannot fetch {filename} from the Hugging Face hub ({HUB_REPO}): "
                        f"{reason}; offline, fit the difficulty with fit_joint_difficulty "
                        "instead") from None
    try:
        return pd.read_csv(path)
    except Exception as e:
        raise DataError(f"cannot parse {filename} from the hub ({path}): {e}") from None


def load_official_instruction_difficulty(*, local_files_only: bool = False) -> pd.Series:
    """AlpacaEval's instruction_difficulty.csv from the hub (raises DataError when offline)."""
    frame = _hub_csv("instruction_difficulty.csv", local_files_only)
    series = frame.set_index(frame.columns[0]).squeeze("columns")
    if not isinstance(series, pd.Series):
        raise DataError("instruction_difficulty.csv from the hub has an unexpected layout")
    return series.rename("instruction_difficulty").rename_axis("index")


def load_official_gamed_baseline(*, local_files_only: bool = False) -> pd.DataFrame:
    """AlpacaEval's df_gamed.csv (gamed-baseline rows for its GLM) from the hub, or DataError."""
    frame = _hub_csv("df_gamed.csv", local_files_only)
    require_columns(frame, ("index", "preference", "std_delta_len", "instruction_difficulty",
                             "not_gamed_baseline"), "df_gamed.csv from the hub")
    return frame.drop(columns=["model"], errors="ignore")


# ------------------------------------------------------------------------- leaderboard


def load_annotations_dir(annotations_dir: Path) -> dict[str, pd.DataFrame]:
    """Every <model>.json in a folder, as {model: annotations DataFrame}, sorted by name."""
    annotations_dir = Path(annotations_dir)
    if not annotations_dir.is_dir():
        raise DataError(f"annotations folder not found: {annotations_dir}")
    files = sorted(annotations_dir.glob("*.json"))
    if not files:
        raise DataError(f"no <model>.json annotation files in {annotations_dir}")
    return {f.stem: read_annotations_frame(f) for f in files}


def reproduce_leaderboard(annotations_dir: Path, *, use_hub: bool = False,
                          difficulty_models: Sequence[str] | None = None,
                          n_splits: int = 5) -> pd.DataFrame:
    """AlpacaEval 2.0 leaderboard columns for every <model>.json in annotations_dir.

    Offline (default): instruction difficulty from the joint fit over all the folder's models,
    and the joint fit's pooled length effect in place of the gamed-baseline rows. use_hub=True
    uses AlpacaEval's own df_gamed.csv instead (needs the Hugging Face hub). difficulty_models
    restricts the joint fit to some models (AlpacaEval fitted its difficulty once, in early
    2024, on the models it had then; later ones such as NullModel were not in it). avg_length
    is the total length of the annotated outputs over the eval-set size (AlpacaEval averages
    over all model outputs; its judge skips empty ones, so those count as length 0).
    """
    frames = load_annotations_dir(annotations_dir)
    order = instruction_order(frames)
    gamed, difficulty, prior = None, None, None
    if use_hub:
        gamed = load_official_gamed_baseline()
        difficulty = gamed.drop_duplicates("index").set_index("index")["instruction_difficulty"]
    else:
        unknown = sorted(set(difficulty_models or ()) - set(frames))
        if unknown:
            raise ConfigError(f"difficulty_models names models with no annotations in "
                              f"{annotations_dir}: {', '.join(unknown)}")
        chosen = frames if difficulty_models is None else {m: frames[m] for m in difficulty_models}
        joint = fit_joint_difficulty(chosen, instructions=order, n_splits=n_splits)
        difficulty, prior = joint.instruction_difficulty, joint.length_prior
    rows = {}
    for model, frame in frames.items():
        row: dict[str, Any] = win_rate_summary(frame["preference"])
        row["avg_length"] = int(frame["output_2"].str.len().sum() / len(order))
        row.update(length_controlled_win_rate(frame, difficulty, gamed_baseline=gamed,
                                              length_prior=prior, n_splits=n_splits))
        rows[model] = row
    table = pd.DataFrame.from_dict(rows, orient="index")[list(LEADERBOARD_COLUMNS)]
    table.index.name = "model"
    return table.sort_values("length_controlled_winrate", ascending=False)


def read_leaderboard_csv(path: Path) -> pd.DataFrame:
    """Read an AlpacaEval leaderboard csv (model names in the first column)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"leaderboard csv not found: {path}")
    try:
        table = pd.read_csv(path, index_col=0)
    except Exception as e:
        raise DataError(f"cannot parse leaderboard csv {path}: {e}") from None
    require_columns(table, ("win_rate", "length_controlled_winrate"), f"leaderboard {path}")
    return table


def compare_leaderboards(ours: pd.DataFrame, official: pd.DataFrame) -> pd.DataFrame:
    """Side-by-side table for the models in both: ours, official and the difference."""
    common = [m for m in ours.index if m in official.index]
    if not common:
        raise DataError("no model appears in both leaderboards")
    out = pd.DataFrame(index=pd.Index(common, name="model"))
    for col in ("win_rate", "standard_error", "length_controlled_winrate", "lc_standard_error"):
        if col in official.columns:
            out[col] = ours.loc[common, col]
            out[f"{col}_official"] = official.loc[common, col]
            out[f"{col}_diff"] = out[col] - out[f"{col}_official"]
    counts = [c for c in ("n_wins", "n_wins_base", "n_draws", "n_total", "avg_length")
              if c in official.columns]
    out["counts_match"] = [
        all(int(ours.loc[m, c]) == int(official.loc[m, c]) for c in counts) for m in common]
    return out


