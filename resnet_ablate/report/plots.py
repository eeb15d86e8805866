"""The report's figures, drawn with seaborn's classic functions on the Agg backend, as PNG bytes.

One palette throughout: shortcut kinds always have the same colours (plain vermillion, residual
blue, residual with projections green, from seaborn's colour-blind palette), depths an ordered
palette (darker = deeper), and other categories the colour-blind palette in order.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

DPI = 120
FAMILY_ORDER = ["plain", "res", "res-proj"]
FAMILY_COLORS = {"plain": "#d55e00", "res": "#0173b2", "res-proj": "#029e73"}
FAMILY_TITLES = {
    "plain": "plain (no shortcut)",
    "res": "residual (identity shortcut)",
    "res-proj": "residual (projection shortcut)",
}
SPLITS = {"train_err": "training error (%)", "test_err": "test error (%)"}
THEME = {**sns.axes_style("whitegrid"), **sns.plotting_context("notebook", font_scale=0.95)}


def depth_palette(depths: list[int]) -> dict[int, tuple[float, float, float]]:
    """Ordered colours for depths, the same mapping in every figure of one report."""
    depths = sorted(set(depths))
    colors = sns.color_palette("crest", max(len(depths), 2))
    return dict(zip(depths, colors, strict=False))


def category_palette(values: list[str]) -> dict[str, str]:
    colors = sns.color_palette("colorblind").as_hex()
    return {v: colors[i % len(colors)] for i, v in enumerate(values)}


def _png(fig: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _families(frame: pd.DataFrame) -> list[str]:
    present = set(frame["family"])
    return [f for f in FAMILY_ORDER if f in present]


def error_curves(curves: pd.DataFrame, palette: dict[int, tuple]) -> bytes:
    """He et al. 2015 Fig. 6: error per epoch, one line per depth (mean over seeds, ± sd band);
    columns are shortcut kinds, rows training and test error."""
    families = _families(curves)
    # Mean and sd over seeds computed once here: seaborn's own estimator is per x value and
    # costs seconds on a 100-run grid.
    stats = (
        curves.groupby(["family", "key", "depth", "epoch"])["error"]
        .agg(["mean", "std"])
        .reset_index()
        .rename(columns={"mean": "error"})
    )
    with plt.rc_context(THEME):
        grid = sns.relplot(
            data=stats,
            x="epoch",
            y="error",
            hue="depth",
            hue_order=sorted(stats["depth"].unique()),
            palette=palette,
            col="family",
            col_order=families,
            row="key",
            row_order=list(SPLITS),
            kind="line",
            estimator=None,
            linewidth=1.4,
            height=2.8,
            aspect=1.35,
            facet_kws={"sharey": "row", "sharex": True},
        )
        for (split, family), ax in grid.axes_dict.items():
            panel = stats[(stats["key"] == split) & (stats["family"] == family)]
            for depth, line in panel.groupby("depth"):
                band = line["std"].fillna(0.0)
                ax.fill_between(
                    line["epoch"],
                    line["error"] - band,
                    line["error"] + band,
                    color=palette[depth],
                    alpha=0.2,
                    linewidth=0,
                )
            ax.set_title(FAMILY_TITLES.get(family, family) if split == "train_err" else "")
            ax.set_ylabel(SPLITS[split] if family == families[0] else "")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(bottom=0)
        grid.legend.set_title("depth (layers)")
        return _png(grid.figure)


def error_against_iterations(frame: pd.DataFrame, palette: dict[int, tuple]) -> bytes:
    """He et al. 2015 Fig. 6 as the paper draws it: error against iterations, plain nets left
    and residual nets right, every depth in each panel in its colour; thin lines the running
    training error within epochs, bold lines the test error at each epoch's end. Lines are the
    mean over seeds, bands their min-max."""
    families = _families(frame)
    depths = sorted(frame["depth"].unique())
    # (family, depth, split, iteration) -> mean, min and max over seeds.
    stats = (
        frame.groupby(["family", "depth", "split", "iteration"])["error"]
        .agg(["mean", "min", "max"])
        .reset_index()
    )
    with plt.rc_context(THEME):
        fig, axes = plt.subplots(
            1, len(families), figsize=(4.6 * len(families), 3.6), sharey=True, squeeze=False
        )
        for ax, family in zip(axes[0], families, strict=True):
            for (depth, split), line in stats[stats["family"] == family].groupby(
                ["depth", "split"]
            ):
                bold = split == "test"
                ax.fill_between(
                    line["iteration"],
                    line["min"],
                    line["max"],
                    color=palette[depth],
                    alpha=0.18 if bold else 0.12,
                    linewidth=0,
                )
                ax.plot(
                    line["iteration"],
                    line["mean"],
                    color=palette[depth],
                    linewidth=2.4 if bold else 0.9,
                    marker="o" if bold else None,
                    markersize=3.5,
                )
            ax.set_title(FAMILY_TITLES.get(family, family))
            ax.set_xlabel("iterations")
            ax.set_xlim(left=0)
        axes[0][0].set_ylabel("error (%)")
        axes[0][0].set_ylim(0, _error_top(stats))
        colours = [
            plt.Line2D([], [], color=palette[d], linewidth=2.0, label=f"{d} layers") for d in depths
        ]
        widths = [
            plt.Line2D([], [], color="#555555", linewidth=0.9, label="training error"),
            plt.Line2D([], [], color="#555555", linewidth=2.4, marker="o", label="test error"),
        ]
        fig.legend(
            handles=colours + widths, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False
        )
        fig.tight_layout()
        return _png(fig)


def _error_top(stats: pd.DataFrame) -> float:
    """The y-axis top: room for every line once training is under way (past the first quarter
    of the iterations), as the paper's axes start below the early, near-chance error."""
    later = stats[stats["iteration"] >= 0.25 * stats["iteration"].max()]
    values = later["max"].dropna()
    values = values[values.abs() < float("inf")]
    if values.empty:
        return 100.0
    return float(min(100.0, max(1.0, 1.15 * values.max())))


def error_vs_depth(cells: pd.DataFrame, style: str | None) -> bytes:
    """Final training and test error against depth, per shortcut kind; bars are ± sd over seeds."""
    long = cells.melt(
        id_vars=["family", "depth", "context"],
        value_vars=["final_train_err", "final_test_err"],
        var_name="key",
        value_name="error",
    )
    long["key"] = long["key"].str.removeprefix("final_")
    with plt.rc_context(THEME):
        grid = sns.relplot(
            data=long,
            x="depth",
            y="error",
            hue="family",
            hue_order=_families(cells),
            palette=FAMILY_COLORS,
            style=style,
            col="key",
            col_order=list(SPLITS),
            kind="line",
            errorbar="sd",
            err_style="bars",
            marker="o",
            height=3.0,
            aspect=1.3,
            facet_kws={"sharey": False},
        )
        depths = sorted(cells["depth"].unique())
        for split, ax in grid.axes_dict.items():
            ax.set_title(f"final {SPLITS[split].removesuffix(' (%)')}")
            ax.set_ylabel("error (%)")
            ax.set_xlabel("depth (layers)")
            ax.set_xticks(depths)
            ax.set_ylim(bottom=0)
        grid.legend.set_title("")
        grid.tight_layout()  # room for the second panel's own y label
        return _png(grid.figure)


def axis_bars(cells: pd.DataFrame, where: str, value: str, axis_label: str) -> bytes:
    """Final test error of each block / unit order (bars: mean over seeds, whiskers: ± sd),
    grouped by the configuration they share (`where`)."""
    groups = list(dict.fromkeys(cells[where]))
    values = list(dict.fromkeys(cells[value]))
    width = min(16.0, max(6.0, 0.35 * len(groups) * len(values) + 2.0))
    with plt.rc_context(THEME):
        fig, ax = plt.subplots(figsize=(width, 3.6))
        sns.barplot(
            data=cells,
            x=where,
            y="final_test_err",
            order=groups,
            hue=value,
            hue_order=values,
            palette=category_palette(values),
            errorbar="sd",
            capsize=0.1,
            err_kws={"linewidth": 1.2},
            ax=ax,
        )
        ax.set_xlabel("")
        ax.set_ylabel("final test error (%)")
        if len(groups) > 5:
            plt.setp(ax.get_xticklabels(), rotation=30, ha="right", rotation_mode="anchor")
        sns.move_legend(
            ax, "upper left", bbox_to_anchor=(1.0, 1.0), title=axis_label, frameon=False
        )
        sns.despine(fig)
        return _png(fig)


def gradient_norms(flows: pd.DataFrame) -> bytes:
    """Gradient L2 norm per conv layer (log scale), input side first; one panel per epoch."""
    frame = flows.assign(
        panel=[
            f"epoch {e}: {w}" if w else f"epoch {e}"
            for e, w in zip(flows["epoch"], flows["when"], strict=True)
        ]
    )
    panels = list(dict.fromkeys(frame.sort_values("epoch")["panel"]))
    with plt.rc_context(THEME):
        grid = sns.relplot(
            data=frame,
            x="layer",
            y="norm",
            hue="net",
            palette={
                net: FAMILY_COLORS.get(family, "#949494")
                for net, family in zip(frame["net"], frame["family"], strict=True)
            },
            units="seed",
            estimator=None,
            col="panel",
            col_order=panels,
            kind="line",
            linewidth=1.2,
            height=3.0,
            aspect=1.4,
        )
        for ax in grid.axes.flat:
            ax.set_yscale("log")
            ax.set_xlabel("layer index from input (0 = stem conv)")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        grid.set_titles("{col_name}")
        grid.set_ylabels("gradient L2 norm (log scale)")
        grid.legend.set_title("")
        return _png(grid.figure)


TRIAL_STYLE = {
    "complete": ("#0173b2", "o"),
    "pruned": ("#949494", "X"),
    "diverged": ("#d55e00", "^"),
}


def trial_history(trials: pd.DataFrame, budget: int) -> bytes:
    """Validation error of each finished trial by trial number, one panel per configuration;
    pruned trials (grey crosses, at the error they were stopped at) and diverged ones marked,
    a step line through the best complete trial so far, and a ring around the best."""
    configs = list(dict.fromkeys(trials["configuration"]))
    statuses = [s for s in TRIAL_STYLE if s in set(trials["status"])]
    wrap = min(len(configs), 3)
    with plt.rc_context(THEME):
        grid = sns.relplot(
            data=trials,
            x="trial",
            y="score",
            hue="status",
            hue_order=statuses,
            palette={s: TRIAL_STYLE[s][0] for s in statuses},
            style="status",
            style_order=statuses,
            markers={s: TRIAL_STYLE[s][1] for s in statuses},
            col="configuration",
            col_order=configs,
            col_wrap=wrap,
            kind="scatter",
            s=55,
            height=2.8,
            aspect=1.3,
            facet_kws={"sharey": True, "sharex": True},
        )
        right = max(budget, int(trials["trial"].max()) + 1) - 0.5
        for config, ax in grid.axes_dict.items():
            mine = trials[trials["configuration"] == config].sort_values("trial")
            scored = mine[mine["status"] != "pruned"]
            if len(scored):
                best_so_far = scored["score"].cummin()
                ax.step(
                    [*scored["trial"], right],
                    [*best_so_far, best_so_far.iloc[-1]],
                    where="post",
                    color=TRIAL_STYLE["complete"][0],
                    alpha=0.5,
                    linewidth=1.2,
                )
                best = scored.sort_values(["score", "trial"]).iloc[0]
                ax.scatter(
                    [best["trial"]], [best["score"]], s=190, facecolors="none", edgecolors="#1d232b"
                )
            ax.set_title(str(config))
            ax.set_xlabel("trial number")
            ax.set_xlim(-0.5, right)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(bottom=0)
        grid.set_ylabels("validation error (%)")
        grid.legend.set_title("")
        return _png(grid.figure)
