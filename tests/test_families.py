"""Gates on GELU, SiLU and softmax (issue 19): units, replacements, lowering, ONNX, per-family budgets."""

from __future__ import annotations

import math

import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import snl_fx
from snl_fx import passes
from snl_fx.budget import Families, as_budget, budget_families
from snl_fx.errors import SnlFxError
from snl_fx.gated import convert, expected_counts, max_abs_diff, prepare
from snl_fx.passes.families import FAMILIES, replacement_fn

TOKENS, DIM, HEADS = 5, 8, 2


class Block(nn.Module):
    """Attention with an explicit softmax, an MLP with GELU (erf), a SiLU and a tanh GELU; ``ops``
    maps each op to what it computes, so a reference with the replacements is the same module."""

    def __init__(self, relu: bool = False) -> None:
        super().__init__()
        self.embed = nn.Linear(4, DIM)
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.fc1, self.fc2, self.fc3 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM), nn.Linear(DIM, DIM)
        self.act = nn.GELU(approximate="tanh")
        self.relu = relu
        self.ops = {"softmax": lambda s: torch.softmax(s, dim=-1), "gelu": F.gelu, "silu": F.silu, "gelu_tanh": self.act}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        if self.relu:
            h = torch.relu(h)
        q, k, v = self.qkv(h).unflatten(-1, (3, HEADS, -1)).permute(2, 0, 3, 1, 4)
        attn = self.ops["softmax"](q @ k.transpose(-2, -1) * 0.5)
        h = h + (attn @ v).transpose(1, 2).flatten(2)
        h = h + self.fc2(self.ops["gelu"](self.fc1(h)))
        return self.ops["gelu_tanh"](self.fc3(self.ops["silu"](h)))


def _model(relu: bool = False) -> Block:
    torch.manual_seed(0)
    return Block(relu).eval()


def _x(batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, TOKENS, 4, generator=torch.Generator().manual_seed(1))


def _set_gates(gm: torch.fx.GraphModule, value: str) -> None:
    g = torch.Generator().manual_seed(2)
    for gate in passes.gates(gm, None).values():
        with torch.no_grad():
            if value == "random":
                gate.weight.copy_((torch.rand(gate.weight.shape, generator=g) > 0.5).float())
            else:
                gate.weight.fill_(1.0 if value == "open" else 0.0)


CHOICES = [(f, u, r) for f in ("gelu", "silu", "softmax") for u in FAMILIES[f].units for r in FAMILIES[f].replacements]


@pytest.mark.parametrize("family,unit,replacement", CHOICES)
def test_every_unit_and_replacement(family: str, unit: str, replacement: str, tmp_path) -> None:
    model, x = _model(), _x()
    gm = prepare(model, x, families=(family,), units={family: unit}, replacements={family: replacement})
    gated = passes.gates(gm, None)
    assert gated and all(passes.get_meta(gm).site(n).family == family for n in gated)
    # all gates open: the original model
    assert max_abs_diff(model, gm, x) < 1e-6
    # all closed: the replacement everywhere
    _set_gates(gm, "closed")
    reference = _model()
    kinds = FAMILIES[family].kinds
    for kind in kinds:
        if kind in reference.ops:
            reference.ops[kind] = lambda t: replacement_fn(family, replacement)(t, t.shape[-1])
    assert max_abs_diff(reference, gm, x) < 1e-5
    # some kept: lowered == gated, in torch and in ONNX Runtime, counts read back per family
    _set_gates(gm, "random")
    lowered = convert(gm)
    assert max_abs_diff(gm, lowered, x) < 1e-5
    assert not any(isinstance(m, passes.NonlinearGate) for m in lowered.modules())
    path = tmp_path / "m.onnx"
    snl_fx.export_onnx(lowered, x[:1], path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert float((torch.from_numpy(got) - gm(x)).abs().max()) < 1e-4
    expected = expected_counts(gm)
    kept = sum(int(g.weight.sum()) * w for g, w in zip(passes.gates(gm, family).values(),
                                                       passes.element_weights(gm, family).values()))
    assert expected[family] == kept + sum(  # ungated sites of the family (a gelu_tanh under "gelu" is gated too)
        s.numel for s in passes.get_meta(gm).sites if s.family == family and s.name not in passes.get_meta(gm).gates)
    for report in (snl_fx.relu_count(path), snl_fx.relu_count(lowered, x)):
        assert report.family_count(family) == expected[family]
        assert report.total == expected.get("relu", 0)


def test_unit_shapes_token_and_head_row() -> None:
    gm = prepare(_model(), _x(), families=("gelu", "softmax"))
    shapes = {passes.get_meta(gm).site(n).kind: tuple(g.weight.shape) for n, g in passes.gates(gm, None).items()}
    assert shapes["softmax"] == (HEADS, TOKENS, 1)  # one gate per head and query row
    assert shapes["gelu"] == (TOKENS, 1) and shapes["gelu_tanh"] == (TOKENS, 1)  # one per token


def test_relu_sites_untouched_when_other_families_gated() -> None:
    model, x = _model(relu=True), _x()
    gm = prepare(model, x, families=("softmax",))
    assert [passes.get_meta(gm).site(n).family for n in passes.get_meta(gm).gates] == ["softmax"]
    _set_gates(gm, "closed")
    assert snl_fx.relu_count(convert(gm), x).total == TOKENS * DIM  # the ReLU stays whole


def test_relu_softmax_replacement_adds_its_relus_to_the_count() -> None:
    model, x = _model(relu=True), _x()
    gm = prepare(model, x, families=("relu", "softmax"), replacements={"softmax": "relu"})
    _set_gates(gm, "random")
    lowered = convert(gm)
    expected = expected_counts(gm)
    cut_rows = sum(int((g.weight == 0).sum()) for g in passes.gates(gm, "softmax").values())
    assert expected["relu"] == snl_fx.gated.relu_count_gated(gm) + cut_rows * TOKENS
    assert snl_fx.relu_count(lowered, x).total == expected["relu"]


@pytest.mark.parametrize("budget", [{"gelu": 0.5, "softmax": 0.25}, {"softmax": 7 * TOKENS}, "gelu=20,silu=50%"])
def test_per_family_budgets_are_met_exactly(budget) -> None:
    model, x = _model(), _x()
    result = snl_fx.linearize(model, x, budget)  # no data: the one-shot selection
    spec = as_budget(budget)
    assert set(result.counts) == set(spec.families)
    for family, value in spec.budgets.items():
        count = result.counts[family]
        allowed = value if isinstance(value, int) else max(1, round(value * count["before"]))
        unit = {"gelu": DIM, "silu": DIM, "softmax": TOKENS}[family]  # token and row gates: whole units
        assert count["budget"] == allowed
        assert count["after"] == allowed // unit * unit
    report = snl_fx.relu_count(result.model, x)
    assert {f: report.family_count(f) for f in result.counts} == {f: c["after"] for f, c in result.counts.items()}


def test_per_family_linearize_trains_and_exports(tmp_path) -> None:
    model, x = _model(), _x(8)
    head = nn.Sequential(model, nn.Flatten(1), nn.Linear(TOKENS * DIM, 3)).eval()
    data = torch.utils.data.TensorDataset(torch.randn(64, TOKENS, 4), torch.randint(0, 3, (64,)))
    result = snl_fx.linearize(head, x, {"gelu": 0.25, "softmax": 0.5}, data, epochs=2, finetune_epochs=1,
                              batch_size=16)
    assert result.method == "snl"
    assert result.counts["gelu"]["after"] <= result.counts["gelu"]["budget"]
    assert result.counts["softmax"]["after"] == result.counts["softmax"]["budget"] // TOKENS * TOKENS
    path = tmp_path / "vit.onnx"
    snl_fx.export_onnx(result.model, x, path)
    report = snl_fx.relu_count(path)
    assert report.family_count("gelu") == result.counts["gelu"]["after"]
    assert report.family_count("softmax") == result.counts["softmax"]["after"]


def test_zoo_vit_decomposed_attention_gets_row_gates() -> None:
    from snl_fx.app.models import vit_tiny_fm

    model, x = vit_tiny_fm().eval(), torch.randn(2, 1, 28, 28)
    gm = prepare(model, x, families=("gelu", "softmax"))
    meta = passes.get_meta(gm)
    softmax = [s for s in meta.sites if s.family == "softmax"]
    assert len(softmax) == 4 and all(s.shape == (4, 17, 17) for s in softmax)
    assert sum(s.numel for s in meta.sites if s.family == "gelu") == 4 * 17 * 128


def test_budget_parsing_and_errors() -> None:
    assert as_budget("gelu=0.1,softmax=25%") == Families({"gelu": 0.1, "softmax": 0.25})
    assert budget_families({"gelu": 3}) == ("gelu",) and budget_families(0.05) == ("relu",)
    for bad, words in [({"swish": 0.1}, "unknown nonlinearity family"), ({"gelu": 1.5}, "budget for gelu"),
                       ("gelu=,softmax=0.1", "is not"), ("=0.1", "family=budget"), ({}, "maps families")]:
        with pytest.raises(SnlFxError, match=words):
            as_budget(bad)
    model, x = _model(), _x()
    for kwargs, words in [(dict(units={"softmax": "token"}), "softmax gates have units row"),
                          (dict(replacements={"gelu": "square"}), "gelu replacements are"),
                          (dict(replacements={"silu": "identity"}), "not among the gated families")]:
        with pytest.raises(SnlFxError, match=words):
            snl_fx.linearize(model, x, {"softmax": 0.5, "gelu": 0.5}, **kwargs)


def test_a_relu_only_model_refuses_a_gelu_budget_in_one_line() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    with pytest.raises(SnlFxError, match="no site of the families"):
        snl_fx.linearize(model, torch.randn(2, 4), {"gelu": 0.5})


def test_a_model_without_relus_names_its_gateable_families() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.GELU()).eval()
    with pytest.raises(SnlFxError, match=r"no ReLU call site.*gelu"):
        snl_fx.linearize(model, torch.randn(2, 4), 2)


def test_log_softmax_and_other_dims_stay_ungated_with_a_warning() -> None:
    class M(nn.Module):
        def forward(self, x):
            return torch.log_softmax(x, -1) + torch.softmax(x, dim=1) + torch.softmax(x, -1)

    x = torch.randn(2, 3, 4)
    with pytest.warns(UserWarning, match="left ungated"):
        gm = prepare(M(), x, families=("softmax",))
    assert [passes.get_meta(gm).site(n).shape for n in passes.get_meta(gm).gates] == [(3, 4)]
    assert math.prod((3, 4)) == passes.get_meta(gm).site(next(iter(passes.get_meta(gm).gates))).numel


SPU_PROTOCOLS = ["spu-semi2k", "spu-cheetah"]


@pytest.mark.parametrize("protocol", SPU_PROTOCOLS)
@pytest.mark.parametrize("replacement", FAMILIES["softmax"].replacements)
def test_a_cost_over_families_ends_within_its_predicted_cost(protocol: str, replacement: str) -> None:
    model, x = _model(), _x()
    gm = prepare(model, x, families=("gelu", "softmax"), replacements={"softmax": replacement})
    low_high = snl_fx.budget.FamilyCostPlan(snl_fx.Cost(bytes=1e12, protocol=protocol, families=("gelu", "softmax")), gm)
    low, high = low_high.value(low_high.none_kept()), low_high.value(low_high.all_kept())
    limit = (low + high) / 2
    budget = snl_fx.Cost(bytes=limit, protocol=protocol, families=("gelu", "softmax"))
    result = snl_fx.linearize(model, x, budget, replacements={"softmax": replacement})
    after = snl_fx.pi_cost(result.model, x[:1], protocol=protocol)
    assert after.complete and after.bytes <= limit * (1 + 1e-9)
    assert result.cost["after"]["bytes"] == pytest.approx(after.bytes, rel=1e-12)
    assert result.cost["met"] and result.counts["gelu"]["budget"] is None
    kept = result.counts["gelu"]["after"] + result.counts["softmax"]["after"]
    assert 0 < kept < result.counts["gelu"]["before"] + result.counts["softmax"]["before"]


def test_a_cost_over_families_refuses_what_it_cannot_meet_or_price() -> None:
    model, x = _model(), _x()
    with pytest.raises(SnlFxError, match="cannot be met"):
        snl_fx.linearize(model, x, snl_fx.Cost(bytes=1.0, protocol="spu-semi2k", families=("gelu", "softmax")))
    with pytest.raises(SnlFxError, match="gelu"):  # CrypTen has no GELU: refused, never priced as free
        snl_fx.linearize(model, x, snl_fx.Cost(bytes=1e9, protocol="crypten", families=("gelu",)))
    with pytest.raises(SnlFxError, match="families"):
        snl_fx.Cost(bytes=1e6, families=("swish",))
    assert as_budget("5MB", "spu-semi2k", "wan", ["gelu", "softmax"]).families == ("gelu", "softmax")
    with pytest.raises(SnlFxError, match="for a cost budget"):
        as_budget("0.1", families=["gelu"])


def _timm_vit():
    timm = pytest.importorskip("timm")
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                             num_classes=10).eval(), torch.randn(2, 3, 32, 32)


def _torchvision_vit():
    torchvision = pytest.importorskip("torchvision")
    return torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                                mlp_dim=64, num_classes=10).eval(), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("build", [_timm_vit, _torchvision_vit], ids=["timm", "torchvision"])
def test_timm_and_torchvision_vits_linearize_through_the_attention_decomposition(build, tmp_path) -> None:
    torch.manual_seed(0)
    model, x = build()
    result = snl_fx.linearize(model, x, {"gelu": 0.5, "softmax": 0.5})
    tokens = (32 // 8) ** 2 + 1
    assert result.counts["softmax"]["before"] > 0 and result.counts["softmax"]["after"] % tokens == 0
    assert 0 < result.counts["gelu"]["after"] <= result.counts["gelu"]["budget"]
    path = tmp_path / "vit.onnx"
    snl_fx.export_onnx(result.model, x[:1], path)  # checked against ONNX Runtime
    report = snl_fx.relu_count(path)
    assert {f: report.family_count(f) for f in ("gelu", "softmax")} == {
        f: result.counts[f]["after"] for f in ("gelu", "softmax")}


def test_a_per_family_run_resumes_to_the_same_model(tmp_path) -> None:
    from test_snl import _interrupt_after_checkpoints

    x = _x(8)
    data = torch.utils.data.TensorDataset(torch.randn(64, TOKENS, 4), torch.randint(0, 3, (64,)))
    opts = dict(epochs=3, finetune_epochs=2, batch_size=16, lambda0=1e-3, progress=False)
    budget = {"gelu": 0.25, "softmax": 0.5}

    def head() -> nn.Module:
        return nn.Sequential(_model(), nn.Flatten(1), nn.Linear(TOKENS * DIM, 3)).eval()

    torch.manual_seed(0)
    straight = snl_fx.linearize(head(), x, budget, data, out_dir=tmp_path / "a", **opts)
    torch.manual_seed(0)
    model = head()
    with pytest.raises(KeyboardInterrupt):  # stop after the second gate epoch
        _interrupt_after_checkpoints(2, lambda: snl_fx.linearize(model, x, budget, data, out_dir=tmp_path / "b", **opts))
    resumed = snl_fx.linearize(model, x, budget, data, out_dir=tmp_path / "b", resume=True, **opts)
    for (k, a), b in zip(straight.gated.state_dict().items(), resumed.gated.state_dict().values()):
        assert torch.equal(a, b), k
    assert straight.counts == resumed.counts
    with pytest.raises(SnlFxError, match="checkpoint"):  # another family budget may not resume it
        snl_fx.linearize(model, x, {"gelu": 0.5, "softmax": 0.5}, data, out_dir=tmp_path / "b", resume=True, **opts)


@pytest.mark.parametrize("penalty", ["sites", "group"])
def test_a_trained_cost_over_families_meets_its_budget(penalty: str) -> None:
    x = _x(8)
    head = nn.Sequential(_model(), nn.Flatten(1), nn.Linear(TOKENS * DIM, 3)).eval()
    data = torch.utils.data.TensorDataset(torch.randn(64, TOKENS, 4), torch.randint(0, 3, (64,)))
    families = ("gelu", "softmax")
    plan = snl_fx.budget.FamilyCostPlan(snl_fx.Cost(bytes=1e12, protocol="spu-semi2k", families=families),
                                        prepare(head, x, families=families))
    limit = (plan.value(plan.none_kept()) + plan.value(plan.all_kept())) / 2
    budget = snl_fx.Cost(bytes=limit, protocol="spu-semi2k", families=families, penalty=penalty)
    result = snl_fx.linearize(head, x, budget, data, epochs=2, finetune_epochs=1, batch_size=16, progress=False)
    assert result.cost["met"] and snl_fx.pi_cost(result.model, x[:1], protocol="spu-semi2k").bytes <= limit * (1 + 1e-9)
    finetune = [h for h in result.history if h["phase"] == "finetune"]
    if penalty == "sites":  # chosen on validation first: every gate epoch goes to the fine-tune
        assert result.cost["site_choice"]["candidates"] >= 1
        assert len(finetune) == 3 and all(h["moved_epochs"] == 2 for h in finetune)
