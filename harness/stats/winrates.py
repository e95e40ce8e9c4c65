"""Win rates with error bars, and AlpacaEval 2.0's length-controlled win rate, reimplemented.

Definitions follow the alpaca_eval package (tatsu-lab/alpaca_eval, Apache-2.0):

* ``win_rate_summary`` is ``metrics.get_winrate``: a preference p lies in [1, 2] (2 = the model,
  output_2, wins); 0 is a legacy draw and becomes 1.5; anything else (NaN, None, out of range)
  is dropped. win_rate = mean(p - 1) * 100, standard_error = SEM (ddof=1) * 100,
  n_wins = #(p > 1.5), n_wins_base = #(p < 1.5), n_draws = #(p == 1.5) (counted before
  dropping), discrete_win_rate = the same after rounding p to 1 or 2 (exact 1.5 stays a draw).
* ``length_controlled_win_rate`` is ``metrics.glm_winrate.get_length_controlled_winrate``
  (``length_controlled_v1``): a logistic GLM of the soft preference p - 1 on
  ``tanh(std_delta_len) + instruction_difficulty + model intercept`` (no other intercept),
  where std_delta_len = (len(output_1) - len(output_2)) / std over the model's annotations.
  Soft labels are fitted by duplicating each row with labels 1 and 0 and weights p and 1 - p;
  the L1 strength C is picked among logspace(-4, 4, 10) by 5-fold GroupKFold cross-validation
  on the soft log loss (liblinear, no intercept), then refit on all rows. The length-controlled
  win rate is the mean predicted preference with the length term set to 0 (x100) and
  lc_standard_error the SEM of those predictions (x100). AlpacaEval regularises each fit toward
  its baseline: the annotations of gpt4_1106_preview made verbose and concise (``df_gamed.csv``
  on the hub; rows without the model intercept) join the training set with total weight 0.2.
  AlpacaEval looks instruction difficulty up by ROW POSITION (row i of the annotations gets
  difficulty[i]), which misaligns models whose annotations skip instructions; we do the same
  by default to reproduce its numbers (pass ``instructions`` to align by instruction text).

The AlpacaEval leaderboard replication (joint instruction difficulty, hub files) is in
`harness.stats.leaderboard`.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from harness.core.errors import ConfigError, DataError

#: AlpacaEval's weight of the gamed-baseline rows in each length-controlled fit.
REGULARIZE_TO_BASELINE_LAMBDA = 0.2
_CS = np.logspace(-4, 4, 10)  # LogisticRegressionCV(Cs=10)


# ----------------------------------------------------------------------------- win rates


def _as_preferences(preferences: Sequence[float] | pd.Series) -> pd.Series:
    """Preferences as floats, None -> NaN and the legacy draw 0 -> 1.5 (AlpacaEval's step 1)."""
    try:
        values = pd.Series(list(preferences), dtype=object)
        values = values.where(values.notna(), np.nan).astype(float)
    except (TypeError, ValueError) as e:
        raise DataError(f"preferences must be numbers in [1, 2] or None: {e}") from None
    return values.replace({0.0: 1.5})


def _valid_unit(values: pd.Series) -> np.ndarray:
    """Keep values in [1, 2] (AlpacaEval drops the rest) and map them to [0, 1]."""
    arr = values.to_numpy(dtype=float)
    keep = (arr >= 1) & (arr <= 2)
    return arr[keep] - 1


def _describe(values: pd.Series) -> dict[str, Any]:
    """AlpacaEval's describe_head2head on already-preprocessed preferences."""
    n_draws = int((values == 1.5).sum())
    unit = _valid_unit(values)
    if unit.size == 0:
        raise DataError("no valid preference (a number in [1, 2]) to compute a win rate from")
    sem = float(np.std(unit, ddof=1) / math.sqrt(unit.size)) if unit.size > 1 else math.nan
    return {
        "win_rate": float(unit.mean() * 100),
        "standard_error": sem * 100,
        "n_wins": int((unit > 0.5).sum()),
        "n_wins_base": int((unit < 0.5).sum()),
        "n_draws": n_draws,
        "n_total": int(unit.size),
    }


def win_rate_summary(preferences: Sequence[float] | pd.Series) -> dict[str, Any]:
    """AlpacaEval's win rate (percent), SEM, win/loss/draw counts and discrete win rate."""
    values = _as_preferences(preferences)
    out = _describe(values)
    # ZeroOneScoringRule: exact 1.5 -> draw, everything else rounded to 1 or 2 (half to even).
    discrete = values.where(values != 1.5, 0.0).round().replace({0.0: 1.5})
    out["discrete_win_rate"] = _describe(discrete)["win_rate"]
    return out


def bootstrap_ci(preferences: Sequence[float] | pd.Series, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Seeded percentile-bootstrap confidence interval of the win rate, in percent."""
    if not 0 < level < 1:
        raise ConfigError(f"bootstrap level must lie in (0, 1), got {level}")
    if n_boot < 1:
        raise ConfigError(f"n_boot must be at least 1, got {n_boot}")
    unit = _valid_unit(_as_preferences(preferences))
    if unit.size == 0:
        raise DataError("no valid preference (a number in [1, 2]) to bootstrap")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, 256):  # chunks keep memory flat for large sets
        stop = min(n_boot, start + 256)
        idx = rng.integers(0, unit.size, size=(stop - start, unit.size))
        means[start:stop] = unit[idx].mean(axis=1)
    alpha = (1 - level) / 2
    low, high = np.quantile(means * 100, [alpha, 1 - alpha])
    return float(low), float(high)


# ------------------------------------------------------------------- soft-label L1 GLM


def _l1_logistic(c: float) -> Any:
    """sklearn's liblinear L1 logistic regression without intercept, across sklearn versions."""
    from sklearn.linear_model import LogisticRegression

    kwargs: dict[str, Any] = dict(C=c, solver="liblinear", fit_intercept=False,
                                  random_state=123, dual=False)
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        kwargs["l1_ratio"] = 1.0  # sklearn >= 1.8 spells the L1 penalty this way
    else:
        kwargs["penalty"] = "l1"
    return LogisticRegression(**kwargs)


def fit_soft_logistic(x: Any, p: np.ndarray, weight: np.ndarray | None,
                       n_splits: int) -> tuple[np.ndarray, float]:
    """AlpacaEval's fit_LogisticRegressionCV(is_ytrue_proba=True): returns (coef, chosen C)."""
    import scipy.sparse as sp
    from sklearn.model_selection import GroupKFold

    n = x.shape[0]
    if n < max(n_splits, 2):
        raise DataError(f"too few valid annotations ({n}) to fit the length-controlled GLM")
    w = np.ones(n) if weight is None else np.asarray(weight, dtype=float)
    x2 = sp.vstack([x, x]).tocsr() if sp.issparse(x) else np.vstack([x, x])
    y = np.r_[np.ones(n), np.zeros(n)]
    sample_weight = np.r_[p * w, (1 - p) * w]
    target, target_weight = np.r_[p, p], np.r_[w, w]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # liblinear convergence chatter at extreme C
        if n_splits > 0:
            groups = np.r_[np.arange(n), np.arange(n)]
            scores = np.zeros(len(_CS))
            for train, test in GroupKFold(n_splits=n_splits).split(x2, y, groups):
                for i, c in enumerate(_CS):
                    model = _l1_logistic(c).fit(x2[train], y[train],
                                                sample_weight=sample_weight[train])
                    q = np.clip(model.predict_proba(x2[test])[:, 1], 1e-15, 1 - 1e-15)
                    t = target[test]
                    loss = -np.mean(target_weight[test] * (t * np.log(q) + (1 - t) * np.log(1 - q)))
                    scores[i] -= loss
            c_best = float(_CS[int(np.argmax(scores))])
        else:
            c_best = 100.0
        model = _l1_logistic(c_best).fit(x2, y, sample_weight=sample_weight)
    return model.coef_[0].copy(), c_best


def sigmoid(z: np.ndarray) -> np.ndarray:
    """Numerically stable logistic function (the one every fit and judge in the harness uses)."""
    return np.exp(-np.logaddexp(0, -np.asarray(z, dtype=float)))


def std_delta_len(frame: pd.DataFrame) -> np.ndarray:
    """(len(output_1) - len(output_2)) / its std (ddof=1); all zeros when it does not vary."""
    delta = (frame["output_1"].str.len() - frame["output_2"].str.len()).to_numpy(dtype=float)
    std = float(np.std(delta, ddof=1)) if delta.size > 1 else 0.0
    return delta / std if std > 0 else np.zeros_like(delta)


def unit_preferences(frame: pd.DataFrame) -> np.ndarray:
    """Preferences mapped to [0, 1] (0 -> draw); NaN where missing or outside [1, 2]."""
    values = _as_preferences(frame["preference"]).to_numpy(dtype=float)
    return np.where((values >= 1) & (values <= 2), values - 1, np.nan)


def require_columns(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    """Raise DataError naming the first missing column."""
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what} lack the column(s) {', '.join(missing)}")


@dataclass(frozen=True)
class LengthPrior:
    """Offline stand-in for AlpacaEval's gamed-baseline rows: their length and difficulty slopes."""

    length_slope: float  # weight on tanh(std_delta_len) for the baseline vs itself
    difficulty_slope: float = 1.0  # weight on instruction difficulty (1 on the joint fit's scale)


@dataclass(frozen=True)
class LengthGLM:
    """One model's fitted length-controlled GLM and its predictions at zero length difference."""

    weights: dict[str, float]  # length, instruction_difficulty (if used), model intercept
    C: float  # L1 strength chosen by cross-validation
    predicted: np.ndarray  # per-annotation preference in [0, 1] with the length term at 0

    @property
    def length_controlled_winrate(self) -> float:
        """Mean predicted preference, in percent."""
        return float(self.predicted.mean() * 100)

    @property
    def lc_standard_error(self) -> float:
        """SEM (ddof=1) of the predicted preferences, in percent (as AlpacaEval reports it)."""
        n = self.predicted.size
        return float(np.std(self.predicted, ddof=1) / math.sqrt(n) * 100) if n > 1 else math.nan


def _difficulty_per_row(frame: pd.DataFrame, difficulty: pd.Series,
                        instructions: Sequence[str] | None) -> np.ndarray:
    """Instruction difficulty of each annotation row: by row position, or by instruction text."""
    if instructions is None:  # AlpacaEval: row i <-> difficulty[i]
        positions = np.arange(len(frame))
    else:
        where = {text: i for i, text in enumerate(instructions)}
        unknown = [t for t in frame["instruction"] if t not in where]
        if unknown:
            raise DataError(f"{len(unknown)} annotated instruction(s) are not in the instruction "
                            f"list, e.g. {unknown[0][:60]!r}")
        positions = frame["instruction"].map(where).to_numpy()
    try:
        return difficulty.loc[positions].to_numpy(dtype=float)
    except KeyError:
        raise DataError(f"instruction_difficulty covers {len(difficulty)} instructions but the "
                        f"annotations need position {int(positions.max())}") from None


def fit_length_glm(annotations: pd.DataFrame, instruction_difficulty: pd.Series | None, *,
                   gamed_baseline: pd.DataFrame | None = None,
                   length_prior: LengthPrior | None = None,
                   regularize_to_baseline_lambda: float = REGULARIZE_TO_BASELINE_LAMBDA,
                   instructions: Sequence[str] | None = None, n_splits: int = 5) -> LengthGLM:
    """Fit AlpacaEval's length-controlled GLM to one model's annotations (see module doc)."""
    require_columns(annotations, ("output_1", "output_2", "preference"), "annotations")
    if gamed_baseline is not None and length_prior is not None:
        raise ConfigError("give either gamed_baseline (AlpacaEval's df_gamed) or length_prior, "
                          "not both")
    frame = annotations.reset_index(drop=True)
    n = len(frame)
    if {"generator_1", "generator_2"} <= set(frame.columns):
        gen1, gen2 = set(frame["generator_1"]), set(frame["generator_2"])
        if len(gen1) == 1 and gen1 == gen2:  # the baseline against itself: 50% by construction
            names = ["np.tanh(std_delta_len)", "not_gamed_baseline"]
            if instruction_difficulty is not None:
                names.insert(1, "instruction_difficulty")
            return LengthGLM({k: 0.0 for k in names}, math.nan, np.full(n, 0.5))
    tanh_len = np.tanh(std_delta_len(frame))
    p = unit_preferences(frame)
    columns = [tanh_len]
    names = ["np.tanh(std_delta_len)"]
    if instruction_difficulty is not None:
        columns.append(_difficulty_per_row(frame, instruction_difficulty, instructions))
        names.append("instruction_difficulty")
    columns.append(np.ones(n))
    names.append("not_gamed_baseline")
    x = np.column_stack(columns)
    weight = np.ones(n)

    extra_x, extra_p, extra_w = None, None, None
    if gamed_baseline is not None and regularize_to_baseline_lambda:
        require_columns(gamed_baseline, ("preference", "std_delta_len", "not_gamed_baseline"),
                         "gamed-baseline rows")
        g_cols = [np.tanh(gamed_baseline["std_delta_len"].to_numpy(dtype=float))]
        if instruction_difficulty is not None:
            require_columns(gamed_baseline, ("instruction_difficulty",), "gamed-baseline rows")
            g_cols.append(gamed_baseline["instruction_difficulty"].to_numpy(dtype=float))
        not_gamed = gamed_baseline["not_gamed_baseline"].astype(bool).to_numpy()
        g_cols.append(not_gamed.astype(float))
        extra_x = np.column_stack(g_cols)
        extra_p = gamed_baseline["preference"].to_numpy(dtype=float)
        # AlpacaEval: weight 1 for the model's rows, lambda / 2 for each of the 2 gamed baselines
        extra_w = np.where(not_gamed, 1.0, regularize_to_baseline_lambda / 2)
    elif length_prior is not None and regularize_to_baseline_lambda:
        # Pseudo gamed-baseline rows at the model's own features, without the model intercept.
        extra_x = x.copy()
        extra_x[:, -1] = 0.0
        logit = length_prior.length_slope * extra_x[:, 0]
        if instruction_difficulty is not None:
            logit = logit + length_prior.difficulty_slope * extra_x[:, 1]
        extra_p = sigmoid(logit)
        extra_w = np.full(n, float(regularize_to_baseline_lambda))

    keep = ~np.isnan(p)
    train_x, train_p, train_w = x[keep], p[keep], weight[keep]
    if extra_x is not None:  # AlpacaEval puts the gamed rows first
        ok = ~np.isnan(extra_p)
        train_x = np.vstack([extra_x[ok], train_x])
        train_p = np.r_[extra_p[ok], train_p]
        train_w = np.r_[extra_w[ok], train_w]
    coef, c_best = fit_soft_logistic(train_x, train_p, train_w, n_splits)
    test_x = x.copy()
    test_x[:, 0] = 0.0  # no length difference
    predicted = sigmoid(test_x @ coef)
    return LengthGLM(dict(zip(names, map(float, coef), strict=True)), c_best, predicted)


def length_controlled_win_rate(annotations: pd.DataFrame,
                               instruction_difficulty: pd.Series | None, *,
                               gamed_baseline: pd.DataFrame | None = None,
                               length_prior: LengthPrior | None = None,
                               regularize_to_baseline_lambda: float = REGULARIZE_TO_BASELINE_LAMBDA,
                               instructions: Sequence[str] | None = None,
                               n_splits: int = 5) -> dict[str, float]:
    """AlpacaEval 2.0's length-controlled win rate and its standard error, in percent.

    instruction_difficulty=None fits the GLM without it (AlpacaEval's length_controlled_minimal
    formula), for private instruction sets that have no difficulty estimate.
    """
    glm = fit_length_glm(annotations, instruction_difficulty, gamed_baseline=gamed_baseline,
                         length_prior=length_prior,
                         regularize_to_baseline_lambda=regularize_to_baseline_lambda,
                         instructions=instructions, n_splits=n_splits)
    return {"length_controlled_winrate": glm.length_controlled_winrate,
            "lc_standard_error": glm.lc_standard_error}


