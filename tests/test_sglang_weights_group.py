"""The weights-update group routes (OpenRLHF's weight sync) survive bad requests: `/init_weights_update_group`,
`/update_weights_from_distributed`, `/destroy_weights_update_group` (sparrow_sgl/sglang/group_routes.py).

One real SGLang server (CPU, tiny Qwen3, sparrow backend) started with a short master wait
(`SPARROW_WEIGHTS_GROUP_WAIT_S`) and group timeout: each bad request gets a one-line 400 naming the problem and the
server still generates at once; a master where nobody listens is refused after the wait (SGLang 0.5.23 blocked its
scheduler for torch's 30 min). This test process is the trainer's rank 0 (gloo, `weight_sync.init_group`) of a real
group: a good init, a good update (loaded whole), bad updates refused with the weights unchanged. Checks without a
server come first.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from test_sglang_robustness import assert_refused, post, torch_load_norm, weights_state  # noqa: E402

from sparrow_sgl.openrlhf.weight_sync import broadcast, destroy_group, init_group  # noqa: E402
from sparrow_sgl.sglang import group_routes  # noqa: E402
from sparrow_sgl.sglang.serve import ServerSpec, start  # noqa: E402

pytestmark = [pytest.mark.sglang, pytest.mark.timeout(900)]

WAIT_S = 4.0  # the server's master wait in this module
GROUP = "sparrow-test-weights"
OK_BODY = {"input_ids": [5, 6, 7, 8], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
QUICK_S = 15.0  # a generate after a refusal; the scheduler must be free


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


DEAD_PORT = _free_port()  # nobody listens here
INIT = dict(master_address="127.0.0.1", master_port=DEAD_PORT, rank_offset=1, world_size=2, group_name="bad")
INIT["backend"] = "gloo"


# -- without a server ---------------------------------------------------------------------------------------------
def test_init_fields_are_checked_and_named(monkeypatch):
    monkeypatch.setattr(group_routes, "GROUPS", {"taken"})
    check = lambda tp=1, device="cpu", **kw: group_routes.init_problem(SimpleNamespace(**{**INIT, **kw}), tp, device)
    assert check() is None
    assert check(tp=2, world_size=3) is None
    for fields, message in [
        ({"master_address": " "}, "master_address must be a host name"),
        ({"master_port": 0}, "master_port must be an integer in [1, 65535], got 0"),
        ({"master_port": 65536}, "got 65536"),
        ({"master_port": True}, "got True"),
        ({"world_size": 1}, "world_size must be an integer >= 2 (rank 0 is the trainer's), got 1"),
        ({"rank_offset": 0}, "rank_offset must be an integer in [1, 1]"),
        ({"rank_offset": 2}, "got 2"),
        ({"tp": 2, "world_size": 3, "rank_offset": 2}, "this server's 2 rank(s) must fit in world_size 3"),
        ({"tp": 2}, "world_size must be an integer >= 3"),
        ({"group_name": ""}, "group_name must be a non-empty string"),
        ({"group_name": "taken"}, "group_name 'taken' is already initialised"),
        ({"backend": "bogus"}, "backend 'bogus' is not usable on this cpu server; use one of gloo"),
        ({"backend": "nccl"}, "backend 'nccl' is not usable on this cpu server"),
    ]:
        assert message in check(**fields), (fields, check(**fields))


def test_tensor_lists_are_checked_against_the_served_layout():
    layout = {"model.norm.weight": ((128,), True)}
    check = lambda names, dtypes, shapes: group_routes.tensor_lists_problem(names, dtypes, shapes, layout)  # noqa: E731
    assert check(["model.norm.weight"], ["bfloat16"], [[128]]) is None
    assert check([], [], []) is None
    assert group_routes.tensor_lists_problem(["x"], ["float32"], [[3]], {}) is None  # no local layout: not checked
    for lists, message in [
        ((["model.norm.weight"], ["float32", "float32"], [[128]]), "got names 1, dtypes 2, shapes 1"),
        ((["model.norm.weight"], "float32", [[128]]), "dtypes 'float32'"),
        (([1], ["float32"], [[128]]), "names[0] must be a string"),
        ((["model.norm.weight"], ["bogus"], [[128]]), "dtypes[0] 'bogus' is no torch dtype name"),
        ((["model.norm.weight"], ["cuda"], [[128]]), "dtypes[0] 'cuda'"),  # a torch attribute, no dtype
        ((["model.norm.weight"], ["float32"], [[-1]]), "shapes[0] must be a list of non-negative integers"),
        ((["model.norm.weight"], ["float32"], [[10**12, 10**12]]), "has shape"),  # never allocated
        ((["model.norm.weight"], ["float32"], [[64]]), "has shape [64], the served model's is [128]"),
        ((["model.nrm.weight"], ["float32"], [[128]]), "nearest: 'model.norm.weight'"),
        ((["model.norm.weight"], ["int64"], [[128]]), "has dtype int64"),
    ]:
        assert message in check(*lists), (lists, check(*lists))


def test_master_probe_waits_for_a_late_listener_and_refuses_a_dead_one():
    """OpenRLHF asks the engines to join before the trainer's rank 0 listens: a single probe would fail spuriously."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    timer = threading.Timer(0.8, listener.listen)
    timer.start()
    try:
        started = time.monotonic()
        assert asyncio.run(group_routes.master_problem("127.0.0.1", port, 5.0)) is None
        assert 0.7 < time.monotonic() - started < 4.0
    finally:
        timer.cancel()
        listener.close()
    started = time.monotonic()
    problem = asyncio.run(group_routes.master_problem("127.0.0.1", port, 1.0))
    assert problem == f"no process group master listening at 127.0.0.1:{port} after 1 s"
    assert 1.0 <= time.monotonic() - started < 3.0
    started = time.monotonic()
    assert "does not resolve" in asyncio.run(group_routes.master_problem("no-such-host.invalid", port, 30.0))
    assert time.monotonic() - started < 10.0  # at once, not after the wait


def test_settings_and_scheduler_hooks(monkeypatch):
    monkeypatch.setenv(group_routes.ENV_WAIT, "2.5")
    assert group_routes.env_seconds(group_routes.ENV_WAIT, 60.0) == 2.5
    for bad in ["0", "-1", "inf", "nan", "soon"]:
        monkeypatch.setenv(group_routes.ENV_TIMEOUT, bad)
        with pytest.raises(ValueError, match=f"{group_routes.ENV_TIMEOUT} must be a positive number"):
            group_routes.check_env()
    monkeypatch.setenv(group_routes.ENV_TIMEOUT, "7")
    seen = {}
    group_routes.bounded_group_init(lambda **kw: seen.update(kw), backend="gloo", timeout=None)
    assert seen["timeout"].total_seconds() == 7 and seen["backend"] == "gloo"

    def asserting(updater, *args):
        raise AssertionError("Group name cannot be empty")

    success, message = group_routes.guard_group_init(asserting, None, "127.0.0.1", 1, 1, 2, "", "gloo")
    assert not success
    assert message == "the weights-update group was not initialised: AssertionError: Group name cannot be empty"


# -- on a real server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tiny_model_factory):
    return tiny_model_factory(hidden_size=128, intermediate_size=256, seed=3)


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    log = tmp_path_factory.mktemp("sglang-weights-group") / "server.log"
    settings = {group_routes.ENV_WAIT: str(WAIT_S), group_routes.ENV_TIMEOUT: "60"}
    with pytest.MonkeyPatch.context() as env:  # the server inherits this process's environment
        for name, value in settings.items():
            env.setenv(name, value)
        srv = start(ServerSpec(model=str(model), schedule="fixed:64", port=_free_port(), kv_tokens=4096), log, 600)
    yield srv
    srv.stop()


def assert_generates(url: str) -> None:
    started = time.monotonic()
    status, payload = post(url, "/generate", OK_BODY, timeout=QUICK_S)
    assert status == 200 and len(payload["output_ids"]) == 3, payload
    assert time.monotonic() - started < QUICK_S


BAD_INITS = [
    ("port-zero", {"master_port": 0}, "master_port must be an integer in [1, 65535], got 0"),
    ("port-above-65535", {"master_port": 70000}, "got 70000"),
    ("port-not-a-number", {"master_port": "abc"}, "master_port: Input should be a valid integer"),
    ("world-size-1", {"world_size": 1}, "world_size must be an integer >= 2"),
    ("rank-offset-0", {"rank_offset": 0}, "rank_offset must be an integer in [1, 1]"),  # the server as its own master
    ("rank-offset-past-world", {"rank_offset": 2}, "must fit in world_size 2"),
    ("group-name-empty", {"group_name": ""}, "group_name must be a non-empty string"),  # killed SGLang's scheduler
    ("backend-unknown", {"backend": "bogus"}, "backend 'bogus' is not usable"),
    ("address-empty", {"master_address": ""}, "master_address must be a host name"),
    ("address-unresolvable", {"master_address": "no-such-host.invalid"}, "'no-such-host.invalid' does not resolve"),
]


@pytest.mark.parametrize(("fields", "expect"), [c[1:] for c in BAD_INITS], ids=[c[0] for c in BAD_INITS])
def test_bad_group_init_is_a_400_at_once_and_the_server_keeps_serving(server, fields, expect):
    started = time.monotonic()
    assert_refused(*post(server.url, "/init_weights_update_group", {**INIT, **fields}, timeout=60), expect)
    assert time.monotonic() - started < WAIT_S  # none of these waits for a master
    assert_generates(server.url)


def test_nccl_on_a_cpu_server_is_refused(server):
    if server.spec.device != "cpu":
        pytest.skip("a GPU server takes nccl")
    assert_refused(*post(server.url, "/init_weights_update_group", {**INIT, "backend": "nccl"}), "'nccl' is not usable")
    assert_generates(server.url)


def test_dead_master_is_refused_after_the_wait_and_generate_is_served_meanwhile(server):
    """SGLang 0.5.23 blocked its scheduler in torch's rendezvous for 30 min: every generate request hung behind it."""
    answer: list = []
    started = time.monotonic()
    init = threading.Thread(target=lambda: answer.append(post(server.url, "/init_weights_update_group", INIT, 60)))
    init.start()
    time.sleep(0.5)
    assert_generates(server.url)
    assert init.is_alive()  # still waiting for the master, the scheduler free
    init.join(60)
    elapsed = time.monotonic() - started
    assert_refused(*answer[0], f"no process group master listening at 127.0.0.1:{DEAD_PORT} after {WAIT_S:g} s")
    assert WAIT_S <= elapsed < WAIT_S + 10, elapsed
    assert_generates(server.url)


def test_update_and_destroy_of_a_group_never_initialised_are_refused(server):
    body = {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[128]], "group_name": GROUP}
    assert_refused(*post(server.url, "/update_weights_from_distributed", body), "none is initialised")
    assert_refused(*post(server.url, "/destroy_weights_update_group", {"group_name": GROUP}), "to destroy")
    assert_generates(server.url)


@pytest.fixture(scope="module")
def group(server):
    """A real group: this process is the trainer's rank 0 and starts listening after the server was asked to join
    (as OpenRLHF does), so the server's probe has to wait for it."""
    answer: list = []
    body = {**INIT, "master_port": _free_port(), "group_name": GROUP}
    join = threading.Thread(target=lambda: answer.append(post(server.url, "/init_weights_update_group", body, 120)))
    join.start()
    time.sleep(1.0)
    trainer = init_group("127.0.0.1", body["master_port"], 0, 2, GROUP, "gloo", 60.0)
    join.join(120)
    status, payload = answer[0]
    assert status == 200 and payload["success"], payload
    yield trainer
    destroy_group(trainer)


def test_a_group_name_is_initialised_once(server, group):
    body = {**INIT, "master_port": _free_port(), "group_name": GROUP}
    expect = f"group_name '{GROUP}' is already initialised"
    assert_refused(*post(server.url, "/init_weights_update_group", body), expect)
    assert_generates(server.url)


def _update(url: str, trainer, named: list) -> tuple[int, dict]:
    """One update session: the server receives while this process (rank 0) broadcasts."""
    body = {"names": [n for n, _ in named], "dtypes": ["float32"] * len(named), "group_name": GROUP}
    body["shapes"] = [list(t.shape) for _, t in named]
    assert post(url, "/begin_weight_update", {})[0] == 200
    answer: list = []
    try:
        receive = threading.Thread(target=lambda: answer.append(post(url, "/update_weights_from_distributed", body)))
        receive.start()
        broadcast(trainer, [t for _, t in named], 60.0, "test update")
        receive.join(120)
    finally:
        assert post(url, "/end_weight_update", {})[0] == 200
    return answer[0]


def test_a_good_update_loads_whole(server, group, model):
    from safetensors.torch import load_file

    before = weights_state(server.url)
    norm = torch_load_norm(load_file, model)
    status, payload = _update(server.url, group, [("model.norm.weight", norm * 3)])
    assert status == 200 and payload["success"], payload
    assert weights_state(server.url) != before
    status, payload = _update(server.url, group, [("model.norm.weight", norm)])
    assert status == 200 and payload["success"], payload
    assert weights_state(server.url) == before


def _bad_update(**fields) -> dict:
    return {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[128]], "group_name": GROUP, **fields}


BAD_UPDATES = [
    ("lists-of-other-lengths", _bad_update(dtypes=["float32"] * 2), "got names 1, dtypes 2, shapes 1"),
    ("dtype-unknown", _bad_update(dtypes=["bogus"]), "dtypes[0] 'bogus' is no torch dtype name"),
    ("shape-negative", _bad_update(shapes=[[-1]]), "shapes[0] must be a list of non-negative integers"),
    ("shape-wrong", _bad_update(shapes=[[64]]), "has shape [64], the served model's is [128]"),  # SGLang: half-loaded
    ("name-unknown", _bad_update(names=["model.nrm.weight"]), "nearest: 'model.norm.weight'"),  # SGLang: "success"
    ("dtype-integer", _bad_update(dtypes=["int64"]), "has dtype int64"),
    ("group-unknown", _bad_update(group_name="nope"), f"initialised: '{GROUP}'"),
]


def test_bad_updates_are_refused_and_the_weights_kept(server, group):
    before = weights_state(server.url)
    assert post(server.url, "/begin_weight_update", {})[0] == 200
    try:
        for _, body, expect in BAD_UPDATES:
            started = time.monotonic()
            assert_refused(*post(server.url, "/update_weights_from_distributed", body, timeout=60), expect)
            assert time.monotonic() - started < QUICK_S  # refused before the scheduler waits for a broadcast
            assert_generates(server.url)
    finally:
        assert post(server.url, "/end_weight_update", {})[0] == 200
    assert weights_state(server.url) == before


def test_destroy_takes_initialised_groups_only(server, group):
    assert_refused(*post(server.url, "/destroy_weights_update_group", {"group_name": "nope"}), "no weights-update")
    status, payload = post(server.url, "/destroy_weights_update_group", {"group_name": GROUP})
    assert status == 200 and payload["success"], payload
    assert_refused(*post(server.url, "/destroy_weights_update_group", {"group_name": GROUP}), "none is initialised")
    assert_generates(server.url)
