"""``Study.load(run_dir)``: a finished run as pandas DataFrames, for notebooks.

Reads only files the pipeline wrote (report.json, diff/features_layer*.csv, irm/word_utilities.csv,
irm/word_attribution.json, SAE metrics); loads no model. SAEs load on demand via ``sae(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from irmlens.errors import IrmlensError
from irmlens.io import read_json
from irmlens.run import RunPaths


@dataclass
class Study:
    run_dir: Path
    report: dict  # report.json, as written

    @classmethod
    def load(cls, run_dir: str | Path) -> Study:
        run_dir = Path(run_dir)
        path = RunPaths(run_dir).report_json
        if not path.exists():
            raise IrmlensError(
                f"{run_dir} has no report/report.json: finish the run first "
                f"(`irmlens run CONFIG --out {run_dir}`)"
            )
        from irmlens.pipeline import verify_finished

        verify_finished(RunPaths(run_dir), upto="report")  # every file read below is as written
        return cls(run_dir, read_json(path))

    # ------------------------------------------------------------------ tables

    @property
    def features(self):
        """Every shared-SAE feature of every studied layer, one row each named by its
        ``dictionary``, ``layer`` and ``feature`` (index within the layer's dictionary):
        divergence in the RLHF and the null pair, means, firing frequencies, Hungarian partners
        (and decoder cosines) in the base and the RLHF SAE with a tag, the dense IRM's raw
        weight where it reads that layer's codes or pre-activations (NaN elsewhere), and the
        feature's rank among the sparse IRM's (``top_features``, the report's one ranking of
        "top IRM features"; NaN when not among them). In the diff
        stage's ranking: the change beyond the null pair's (comparable across layers: each a
        fraction of its layer's activation norm)."""
        import pandas as pd

        coef = self.irm_coefficients()
        frames = [self._layer_table(layer, coef) for layer in self.diff_layers()]
        return _ranked(pd.concat(frames, ignore_index=True))

    def _layer_table(self, layer: int, coef=None):
        """One layer's features table with its reference columns, the dense IRM's weights
        (``coef``: the IRM's coefficients, read here when not given) and the sparse-IRM rank."""
        import pandas as pd

        from irmlens.irm.fit import irm_feature_weights

        df = pd.read_csv(self._features_table(layer))
        df.insert(0, "layer", layer)
        df.insert(0, "dictionary", "shared")
        coef = self.irm_coefficients() if coef is None else coef
        weights = irm_feature_weights(self.report["irm"], coef, len(df), layer)
        df["irm_weight"] = [weights.get(j, float("nan")) for j in df["feature"]]
        rank = {
            f["local_feature"]: i
            for i, f in enumerate(self.report["irm"]["top_features"])
            if f.get("dictionary") == "shared" and f.get("layer") == layer
        }
        df["sparse_irm_rank"] = [rank.get(j, float("nan")) for j in df["feature"]]
        return df

    @property
    def top_features(self):
        """The "top IRM features", the one ranking the report, the cards and the validation
        use: the sparse IRM's features in selection order (rank 0 explains the most), each as
        (dictionary, layer, feature) with its weight and standardised weight. (``features``'s
        ``irm_weight`` is the dense IRM's raw coefficient, a different model; its
        ``sparse_irm_rank`` is this ranking.)"""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "rank": i,
                    "dictionary": f.get("dictionary"),
                    "layer": f.get("layer"),
                    "feature": f.get("local_feature", f["feature"]),
                    "weight": f["weight"],
                    "standardised_weight": f.get("standardised_weight"),
                    "top_words": ", ".join(f.get("top_words", [])),
                }
                for i, f in enumerate(self.report["irm"]["top_features"])
            ]
        )

    def _features_table(self, layer: int) -> Path:
        return RunPaths(self.run_dir).features_table(layer)

    def diff_layers(self) -> list[int]:
        """Layers with a feature-divergence table (every studied layer)."""
        return sorted(
            int(p.stem.removeprefix("features_layer"))
            for p in RunPaths(self.run_dir).diff.glob("features_layer*.csv")
        )

    def features_of_layer(self, layer: int):
        """One layer's rows of ``features``, in the same ranking."""
        return _ranked(self._layer_table(layer))

    @property
    def words(self):
        """Every lexicon word in the cached text: split (fit/held-out), true utility, IRM utility,
        model-level implicit reward, number of positions."""
        import pandas as pd

        from irmlens.irm.words import COLUMNS, read_word_utilities

        return pd.DataFrame(read_word_utilities(self.run_dir), columns=list(COLUMNS))

    @property
    def word_attribution(self):
        """Held-out words with their divergence and top contributing features (long format), each
        feature as (dictionary, layer, feature)."""
        import pandas as pd

        rows = []
        for w in read_json(RunPaths(self.run_dir).word_attribution):
            for rank, f in enumerate(w["top_features"]):
                rows.append(
                    {
                        "word": w["word"],
                        "true": w["true"],
                        "irm": w["irm"],
                        "divergence": w["divergence"],
                        "rank": rank,
                        # the feature as (dictionary, layer, index); ``column`` is its column in
                        # the IRM's space (a multi-layer space concatenates the layers)
                        "dictionary": f.get("dictionary", "shared"),
                        "layer": f.get("layer", self.report["irm"]["layer"]),
                        "feature": f.get("local_feature", f["feature"]),
                        "column": f["feature"],
                        "contribution": f["contribution"],
                    }
                )
        return pd.DataFrame(rows)

    @property
    def saes(self):
        import pandas as pd

        return pd.DataFrame(self.report["saes"])

    @property
    def spaces(self):
        """The IRM in every feature space on the same split."""
        import pandas as pd

        return pd.DataFrame(self.report["irm"]["spaces"])

    @property
    def controls(self):
        """The main IRM, its references and its controls, one row each
        (``irmlens.report.summary.result_rows``), with flat columns: ``heldout_kendall_tau``
        once, the row's CI as ``ci_low``/``ci_high`` with ``ci_of`` saying what it bounds (the
        row's tau, or for a control the paired difference IRM - control), and the row's other
        scores from report.json (Spearman, CV R², ...) — the IRM's and the sparse IRM's
        included."""
        import pandas as pd

        from irmlens.report.summary import result_rows

        irm, controls = self.report["irm"], self.report["controls"]
        scores = irm["reference"] | controls | {"irm": irm, "sparse_irm": irm["sparse"]}
        rows = []
        for r in result_rows(self.report):
            ci = r.get("ci") or [None, None]
            rows.append(
                {"name": r["name"], "label": r["label"], "kind": r["kind"]}
                | {k: scores.get(r["name"], {}).get(k) for k in _SCORE_COLUMNS}
                | {
                    "heldout_kendall_tau": r["tau"],
                    "ci_low": ci[0],
                    "ci_high": ci[1],
                    "ci_of": None
                    if r.get("ci") is None
                    else "difference"
                    if r["kind"] == "control"
                    else "tau",
                }
            )
        return pd.DataFrame(rows)

    @property
    def mediation(self):
        """Where the reward lives (stage ``mediate``): one row per studied layer and basis, with
        the share of the layer's gain its top 1, 8 and 32 components remove and reproduce, the
        area under each curve and the k reaching faithfulness 0.8; ``attrs["sweep"]`` holds the
        layer sweep, ``attrs["sweeps"]`` every text set and metric's, ``attrs["studied"]`` the
        studied layers' share (and its warning), ``attrs["comparison"]`` per layer the best
        dictionary against the best other basis with paired CIs, and ``attrs["verdict"]`` the
        sentence. Empty for a run without the stage."""
        import pandas as pd

        from irmlens.mediate.curves import share_at

        m = self.report.get("mediation")
        rows = []
        for layer, res in (m or {}).get("layers", {}).items():
            for name, c in res["bases"].items():
                row = {"layer": int(layer), "basis": name, "dictionary": c["dictionary"]}
                for direction in ("removed", "reproduced"):
                    for k in (1, 8, 32):
                        row[f"{direction}_k{k}"] = share_at(c[direction], k)
                    row[f"{direction}_area"] = c[direction]["area"]
                    row[f"{direction}_k_at_80"] = c[direction]["k_at_80"]
                rows.append(row)
        frame = pd.DataFrame(rows)
        frame.attrs["sweep"] = (m or {}).get("sweep")
        frame.attrs["sweeps"] = (m or {}).get("sweeps")
        frame.attrs["studied"] = (m or {}).get("studied")
        frame.attrs["comparison"] = {
            int(la): res.get("comparison") for la, res in (m or {}).get("layers", {}).items()
        }
        frame.attrs["verdict"] = (m or {}).get("verdict")
        return frame

    @property
    def validation(self):
        """Every validation arm (baselines, ablations, steering at each scale), one row each:
        reward with its CI, share of the RLHF gain removed or reproduced, KL, perplexity and the
        main arm minus this one (paired over prompts). Empty for a run without the stage."""
        import pandas as pd

        v = self.report.get("validation") or {"arms": []}
        rows = []
        for a in v["arms"]:
            d = a.get("main_minus_this") or {}
            rows.append(
                _scalars(a)
                | {
                    "reward_ci_low": a["reward_ci"][0],
                    "reward_ci_high": a["reward_ci"][1],
                    "main_minus_this": d.get("mean"),
                    "main_minus_this_ci_low": (d.get("ci") or [None])[0],
                    "main_minus_this_ci_high": (d.get("ci") or [None, None])[1],
                }
            )
        return pd.DataFrame(rows)

    @property
    def labels(self):
        """The sparse IRM's features with every labeler's label and explanation, one row per
        feature and labeler (``set`` says whose features: sparse_irm, random_sae_sparse)."""
        import pandas as pd

        found = self.report.get("labels") or {"sets": {}}
        return pd.DataFrame(
            [
                {"set": name, "labeler": labeler} | _scalars(r)
                for name, per in found["sets"].items()
                for labeler, rows in per.items()
                for r in rows
            ]
        )

    @property
    def metrics(self) -> dict:
        """Headline numbers as a flat dict."""
        irm = self.report["irm"]
        out = {
            "heldout_kendall_tau": irm["heldout_kendall_tau"],
            "heldout_kendall_tau_ci": irm["heldout_kendall_tau_ci"],
            "signal_retention": irm["signal_retention"],
            "sparse_heldout_kendall_tau": irm["sparse"]["heldout_kendall_tau"],
            "paper_estimator_kendall_tau": self.report["paper_estimator"]["kendall_tau"],
        }
        if self.report["rlhf"]:
            out |= {k: self.report["rlhf"][k] for k in ("reward_before", "reward_after", "kl")}
        return out

    # ------------------------------------------------------------------ objects

    def irm_coefficients(self):
        from safetensors.torch import load_file

        return load_file(str(RunPaths(self.run_dir).irm_coefficients))["coef"]

    # ------------------------------------------------------------------ one feature

    def card(self, dictionary: str, layer: int, feature: int) -> dict:
        """The report's card of feature (``dictionary``, ``layer``, ``feature``): contexts,
        histograms, logit effect, labels, ablation effect. A feature without a card is refused
        naming which features have one (cards cover the IRM layer's most divergent features and
        every sparse-IRM feature)."""
        from irmlens.refs import feature_label

        cards = self._cards()
        found = cards.get((dictionary, layer, feature))
        if found is None:
            same_index = self.card_layers(dictionary, feature)
            hint = (
                f"; index {feature} has a card at layer {same_index} (another feature)"
                if same_index
                else ""
            )
            raise IrmlensError(
                f"{feature_label(dictionary, layer, feature)} has no card{hint}: cards cover the "
                f"IRM layer's {len([c for c in cards.values() if 'divergent' in c['reason']])} "
                "most divergent features and the sparse IRM's features (Study.features has "
                "every feature's numbers)"
            )
        return found

    def card_layers(self, dictionary: str, feature: int) -> list[int]:
        """The layers whose index ``feature`` of ``dictionary`` has a card (each another
        feature): what a lookup by index alone would have to choose between."""
        return sorted(la for d, la, j in self._cards() if d == dictionary and j == feature)

    def _cards(self) -> dict[tuple[str, int, int], dict]:
        from irmlens.refs import card_ref

        return {card_ref(c): c for c in self.report["feature_cards"]}

    def top_contexts(self, dictionary: str, layer: int, feature: int, model: str = "rlhf"):
        """The contexts where feature (``dictionary``, ``layer``, ``feature``) fires most in
        ``model`` ("base" or "rlhf"), from its card: one row per context, its tokens joined
        with the peak token marked [[like this]], and the peak activation."""
        import pandas as pd

        _check_card_model(model)
        return pd.DataFrame(
            [
                {"context": _marked(c), "max": c["max"]}
                for c in self.card(dictionary, layer, feature)[f"contexts_{model}"]
            ]
        )

    def quantile_samples(self, dictionary: str, layer: int, feature: int, model: str = "rlhf"):
        """Contexts sampled from each quartile band of the feature's non-zero activations in
        ``model``, from its card (what most of its firings look like, beside its top
        contexts): one row per context with its band, the band's activation range, the
        context (peak token marked [[like this]]) and its activation."""
        import pandas as pd

        _check_card_model(model)
        rows = []
        for band in self.card(dictionary, layer, feature).get(f"quantiles_{model}") or []:
            rows += [
                {
                    "band": band["band"],
                    "low": band["low"],
                    "high": band["high"],
                    "context": _marked(c),
                    "activation": c["max"],
                }
                for c in band["contexts"]
            ]
        return pd.DataFrame(rows, columns=["band", "low", "high", "context", "activation"])

    def find_cards(self, token: str):
        """The cards with a token containing ``token`` (case-insensitive) where the feature fires
        (its contexts' peak tokens) or among the tokens it promotes or suppresses: one row per
        card, (dictionary, layer, feature) and the matching tokens; the report's card search."""
        import pandas as pd

        from irmlens.viz.card_html import card_tokens

        q = token.strip().lower()
        if not q:
            raise IrmlensError("find_cards(''): give a token (e.g. 'great')")
        rows = []
        for (dictionary, layer, feature), card in self._cards().items():
            hits = [t for t in card_tokens(card) if q in t]
            if hits:
                rows.append(
                    {
                        "dictionary": dictionary,
                        "layer": layer,
                        "feature": feature,
                        "tokens": ", ".join(hits),
                    }
                )
        return pd.DataFrame(rows, columns=["dictionary", "layer", "feature", "tokens"])

    def feature(self, dictionary: str, layer: int, feature: int) -> dict:
        """Everything the run holds on feature (``dictionary``, ``layer``, ``feature``): its row
        of ``features`` (divergence in both pairs, frequencies, IRM weight, sparse-IRM rank,
        partners) and, where it has one, its card."""
        from irmlens.refs import feature_label

        if dictionary != "shared":
            raise IrmlensError(
                f"{feature_label(dictionary, layer, feature)}: the feature tables are the shared "
                "dictionary's (dictionary = 'shared')"
            )
        layers = self.diff_layers()
        df = self._layer_table(layer) if layer in layers else None
        row = None if df is None else df[df["feature"] == feature]
        if row is None or row.empty:
            raise IrmlensError(
                f"{feature_label(dictionary, layer, feature)} is not in the run's tables "
                f"(layers {layers}, "
                f"{self.report['feature_divergence']['n_features']} features each)"
            )
        return row.iloc[0].to_dict() | {"card": self._cards().get((dictionary, layer, feature))}

    def sae(self, model: str = "shared", layer: int | None = None, width: int | None = None):
        """A saved SAE (sae-lens ``SAE``); defaults: the IRM's layer and width."""
        from sae_training.train import load_sae

        irm = self.report["irm"]
        layer = irm["layer"] if layer is None else layer
        width = irm["sae"]["width"] if width is None else width
        from irmlens.cache.store import hook_kind

        kind = hook_kind(irm.get("hook"))
        return load_sae(RunPaths(self.run_dir).sae_dir(model, f"blocks.{layer}.hook_{kind}", width))


# the scores ``Study.controls`` shows beside each row's tau (None where a row has none)
_SCORE_COLUMNS = (
    "heldout_spearman",
    "cv_r2",
    "signal_retention",
    "heldout_kendall_tau_std",
    "description",
)


def _check_card_model(model: str) -> None:
    if model not in ("base", "rlhf"):
        raise IrmlensError(f"model = {model!r}: cards hold contexts of 'base' and 'rlhf'")


def _marked(context: dict) -> str:
    """A card context's text with its peak token marked [[like this]]."""
    toks = list(context["tokens"])
    toks[context["focus"]] = f"[[{toks[context['focus']]}]]"
    return "".join(toks)


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str)) or v is None}


def _ranked(df):
    """A feature table in the diff stage's ranking: the change beyond the null pair's (ties in
    feature order, as the stage breaks them)."""
    return df.sort_values("divergence_beyond_null", ascending=False, kind="stable").reset_index(
        drop=True
    )
