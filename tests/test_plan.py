import pytest

from cqil.plan import Plan, PlanError


def test_name_round_trip():
    for name in ["S12-E30-P2-D0", "S14-E30-P4-D0", "S12-E30-P2-D1", "S0-E8-P4-D3-official"]:
        assert str(Plan.parse(name)) == name
    assert Plan.parse("S12-E30-P2-D1-paper") == Plan(12, 30, 2, 1, "paper")
    assert Plan.parse("S12-E30-P2-D1-official").bypass_mode == "official"


def test_without_bypass_both_modes_are_one_plan():
    assert Plan(12, 30, 2, 0, "official") == Plan(12, 30, 2, 0)
    assert str(Plan(12, 30, 2, 0, "official")) == "S12-E30-P2-D0"


@pytest.mark.parametrize(
    "args, field",
    [
        ((12, 30, 0), "P=0"),
        ((30, 12, 2), "S < E"),
        ((12, 12, 2), "S < E"),
        ((-1, 12, 1), "S < E"),
        ((12, 29, 2), "multiple of P=2"),
        ((12, 30, 2, 2), "D=2"),
        ((12, 30, 2, -1), "D=-1"),
        ((12, 30, 2, 1, "fancy"), "bypass_mode='fancy': allowed are paper, official"),
        ((12.0, 30, 2), "start must be an integer"),
    ],
)
def test_bad_plans_fail_with_one_line(args, field):
    with pytest.raises(PlanError) as err:
        Plan(*args)
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["S12-E30", "12-30-2-0", "S12-E30-P2-D0-fast", "", "s12-e30-p2-d0"])
def test_bad_names(name):
    with pytest.raises(PlanError, match="expected the form S12-E30-P2-D0"):
        Plan.parse(name)


def test_validate_against_layer_count():
    assert Plan(18, 28, 2).validate(30) == Plan(18, 28, 2)
    assert Plan(0, 30, 2).validate(30)
    with pytest.raises(PlanError, match="E=32 exceeds the model's 30 layers"):
        Plan(12, 32, 2).validate(30)


def test_official_names_are_zero_indexed_end_exclusive():
    # The official README's "P2 D0 S12 E30" (and its released adapters) is layers 12..29 in pairs: our S12-E30-P2-D0.
    assert Plan.from_paper("P2 D0 S12 E30") == Plan.parse("S12-E30-P2-D0")
    assert Plan.from_paper("P4 S14 E30") == Plan(14, 30, 4, 0)  # D left out: D0
    assert Plan.from_paper("S17 E37 P2 D0").ideal_reduction(40) == Plan(17, 37, 2).ideal_reduction(40)  # Qwen1.5-14B
    # its D1 adapter was trained with the official code's arithmetic (bypassed outputs in the residual too)
    assert str(Plan.from_paper("P2 D1 S12 E30")) == "S12-E30-P2-D1-official"


@pytest.mark.parametrize(
    "name, message",
    [
        ("S13-E30-P2-D0", "expected the official form P2 D0 S12 E30"),
        ("P2 P4 S12 E30", "expected the official form P2 D0 S12 E30"),
        ("P2 D0 S12", "needs E (the official form P2 D0 S12 E30)"),
        ("P2 D2 S12 E30", "D=2 must satisfy 0 <= D < P=2"),
    ],
)
def test_bad_official_names_fail_with_one_line(name, message):
    with pytest.raises(PlanError) as err:
        Plan.from_paper(name)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_groups_steps_and_ideal_reduction():
    plan = Plan(12, 30, 2)
    assert [list(g) for g in plan.groups()][:2] == [[12, 13], [14, 15]]
    assert len(plan.groups()) == 9 and plan.groups()[-1] == range(28, 30)
    assert plan.steps(32) == 32 - 18 + 9
    assert plan.ideal_reduction(32) == pytest.approx(0.28125)  # PAPER.md: LLaMA-7B S12 E30 P2, 28.1%
    assert Plan(14, 30, 4).ideal_reduction(32) == pytest.approx(0.375)  # 37.5%
    assert Plan(14, 26, 2).ideal_reduction(30) == 0.2  # exact: a 20% threshold keeps it
    assert Plan(0, 30, 1).steps(30) == 30 and Plan(0, 30, 1).ideal_reduction(30) == 0
    with pytest.raises(PlanError):
        Plan(12, 30, 2).steps(20)


def test_grid_keeps_only_valid_plans():
    plans = Plan.grid(
        30, starts=range(10, 20, 2), ends=[28, 30], sizes=[1, 2, 3, 4], bypasses=[0, 1], modes=["paper", "official"]
    )
    assert plans == sorted(set(plans))
    assert all(p.size > 1 and (p.end - p.start) % p.size == 0 and p.bypass < p.size for p in plans)
    assert Plan(12, 30, 2, 1, "official") in plans and Plan(12, 30, 2, 0) in plans
    assert Plan(10, 28, 3, 0) in plans and Plan(12, 30, 3, 1) in plans
    # D0 plans are not duplicated by the two bypass modes
    assert sum(p == Plan(12, 30, 2, 0) for p in plans) == 1
    assert Plan.grid(30, [20], [28], [2]) == [Plan(20, 28, 2)]
    assert Plan.grid(8, [0], [30], [2]) == []  # E beyond the model
