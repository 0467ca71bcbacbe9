"""Contract items 1, 4-6 across real processes: W = 1, 2, 4 gloo ranks (and 2 nodes, on one loopback or across a
real network hop between two network namespaces) give the same model and the same ε for the same seed; micro-batch
size and feature caching do not change the result; ranks hold identical parameters (checked by the trainer every
step here). A run stopped by a signal, or by one of its processes killed with SIGKILL, resumes to the same model:
bit for bit at the same world size, to float tolerance at another. A lost or hung process ends the others within a
bounded time, with a message that says how to continue.

Tolerance: W = 1 against W = 2 or 4 differ by float rounding (the all-reduce sums the per-rank sums in another
order). Every 2-rank run is compared bit for bit with `two_processes`: a sum of two values does not depend on their
order, so launchers, network and resumes must not change a single bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, accelerate_launch, free_port, offline_env, prepare_data
from safetensors.torch import load_file

from dpmix_dist.testing.datagen import make_fashion_mnist_idx, make_synthetic_folder

pytestmark = pytest.mark.slow
SEED = "424242"


def _env() -> dict[str, str]:
    return offline_env(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES=None)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    raw = make_fashion_mnist_idx(root / "idx", num_train=240, num_test=60)
    out = root / "shards"
    prepare_data("fashion_mnist", "--source", str(raw), "--out", str(out))
    return out


def _node_cmd(machine_rank: int, main_ip: str, port: int) -> list[str]:
    """accelerate launch of one node of a 2-node run, one process per node (configs/accelerate/multinode.yaml)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "configs/accelerate/multinode.yaml",
        "--num_machines",
        "2",
        "--num_processes",
        "2",
        "--machine_rank",
        str(machine_rank),
        "--main_process_ip",
        main_ip,
        "--main_process_port",
        str(port),
    ]


def _workers(launcher: subprocess.Popen) -> list[int]:
    """The processes a launcher started (torch's elastic agent gives each worker a session of its own)."""
    children = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == launcher.pid:
                children.append(int(entry.name))
        except (OSError, IndexError, ValueError):  # gone meanwhile
            continue
    return children


def _kill(launchers: list[subprocess.Popen]) -> None:
    """SIGKILL whatever is left of these launchers and their workers (a test's own processes, by pid)."""
    for launcher in launchers:
        for pid in _workers(launcher) + [launcher.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        launcher.wait(timeout=30)


def _train_args(shards: Path, out: Path, cache: Path, *overrides: str) -> list[str]:
    return [
        "launch/finetune.py",
        "--config",
        "tiny_test",
        "--seed",
        SEED,
        "--output-dir",
        str(out),
        f"data.root={shards}",
        f"data.cache_dir={cache}",
        "run.eval_every_epochs=0.1",
        *overrides,
    ]


def _run(num_processes: int, shards: Path, out: Path, *overrides: str, timeout: int = 300) -> dict:
    cmd = accelerate_launch(num_processes) + _train_args(shards, out, out.parent / "cache", *overrides)
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert SEED not in proc.stdout + proc.stderr.replace(f"--seed {SEED}", "")
    return json.loads((out / "summary.json").read_text())


def _assert_same_model(a: Path, b: Path, atol: float = 1e-5) -> None:
    ma, mb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.allclose(ma[key], mb[key], atol=atol, rtol=1e-4), key


def _assert_identical_model(a: Path, b: Path) -> None:
    ma, mb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert ma.keys() == mb.keys()
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key


def _trained_something(a: Path) -> None:
    head = load_file(a / "model.safetensors")["classifier.weight"]
    assert head.abs().sum() > 0  # starts at zero: the check above compares real updates


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w1") / "run"
    _run(1, shards, out)
    _trained_something(out)
    return out


@pytest.fixture(scope="module")
def two_processes(shards, tmp_path_factory) -> Path:
    """The reference run in 2 gloo processes (one launcher): every other 2-rank run must equal it bit for bit."""
    out = tmp_path_factory.mktemp("w2") / "run"
    _run(2, shards, out)
    return out


@pytest.mark.parametrize("world_size", [2, 4])
def test_world_size_does_not_change_the_result(shards, reference, two_processes, tmp_path, world_size):
    out = two_processes if world_size == 2 else tmp_path / "run"
    if world_size != 2:
        _run(world_size, shards, out)
    summary = json.loads((out / "summary.json").read_text())
    ref = json.loads((reference / "summary.json").read_text())
    assert summary["world_size"] == world_size
    assert summary["epsilon"] == ref["epsilon"] and summary["steps"] == ref["steps"]
    assert summary["test_accuracy"] == pytest.approx(ref["test_accuracy"], abs=1 / 60 + 1e-9)
    _assert_same_model(reference, out)


def test_micro_batch_size_feature_cache_and_engine_do_not_change_the_result(shards, reference, tmp_path):
    # the reference ran the default layer-wise engine; this one the generic torch.func engine
    _run(
        1,
        shards,
        tmp_path / "run",
        "performance.micro_batch_size=3",
        "performance.cache_frozen_features=false",
        "performance.engine=functorch",
    )
    _assert_same_model(reference, tmp_path / "run")


AUGMENTED = {
    "self_aug": ["augment.num_views=3"],
    "dpmix_self": ["augment.num_views=2", "augment.num_mixes=3"],
    "dpmix_diff": ["augment.num_views=2", "augment.num_mixes=3", "augment.num_synthetic=2"],
}


@pytest.mark.parametrize("method", list(AUGMENTED))
def test_world_size_does_not_change_an_augmented_run(shards, reference, tmp_path, method):
    """Each example's views, mixes and synthetic draws depend on (seed, step, example) only: 1 process (with
    another micro-batch size) and 2 processes give the same model, and the same ε as plain DP-SGD."""
    overrides = [f"augment.method={method}", *AUGMENTED[method]]
    if method == "dpmix_diff":
        classes = json.loads((shards / "metadata.json").read_text())["classes"]
        overrides.append(f"augment.synthetic_root={make_synthetic_folder(tmp_path / 'syn', classes, per_class=3)}")
    one = _run(1, shards, tmp_path / "w1", *overrides, "performance.micro_batch_size=5")
    two = _run(2, shards, tmp_path / "w2", *overrides)
    _trained_something(tmp_path / "w1")
    _assert_same_model(tmp_path / "w1", tmp_path / "w2")
    ref = json.loads((reference / "summary.json").read_text())
    assert one["method"] == two["method"] == method and one["group_size"] > 1
    assert one["epsilon"] == two["epsilon"] == ref["epsilon"] and one["steps"] == ref["steps"]
    a, b = load_file(reference / "model.safetensors"), load_file(tmp_path / "w1" / "model.safetensors")
    assert not torch.allclose(a["classifier.weight"], b["classifier.weight"])  # the method did change training


def test_different_seed_gives_a_different_model(shards, reference, tmp_path):
    out = tmp_path / "run"
    cmd = accelerate_launch(1) + _train_args(shards, out, tmp_path / "cache")
    cmd[cmd.index(SEED)] = "7"
    subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, check=True, timeout=300)
    a, b = load_file(reference / "model.safetensors"), load_file(out / "model.safetensors")
    assert not torch.allclose(a["classifier.weight"], b["classifier.weight"])


def test_two_simulated_nodes_match_one_process(shards, reference, two_processes, tmp_path):
    port, out = free_port(), tmp_path / "run"
    procs = []
    for machine_rank in (0, 1):
        cmd = _node_cmd(machine_rank, "127.0.0.1", port)
        cmd += _train_args(shards, out, tmp_path / f"cache{machine_rank}")  # node-local caches
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    _assert_same_model(reference, out)
    _assert_identical_model(two_processes, out)


def test_interrupted_run_resumes_to_the_same_model(shards, reference, two_processes, tmp_path):
    out = tmp_path / "run"
    # slow the steps a little so the signal lands mid-run, and checkpoint every step
    cmd = accelerate_launch(2) + _train_args(shards, out, tmp_path / "cache", "run.checkpoint_every_epochs=0.1")
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 240
    while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    if (out / "summary.json").exists():
        pytest.skip("the run finished before the signal landed")  # fixed-size work: should not happen
    assert proc.returncode != 0
    assert (out / "checkpoint.pt").exists()
    assert (os.stat(out / "checkpoint.pt").st_mode & 0o777) == 0o600  # private artifact: holds the seed
    resumed = subprocess.run(
        accelerate_launch(2) + _train_args(shards, out, tmp_path / "cache") + ["--resume"],
        cwd=REPO,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert not (out / "checkpoint.pt").exists()
    _assert_same_model(reference, out)
    _assert_identical_model(two_processes, out)


def test_check_identical_detects_diverged_ranks(tmp_path):
    script = tmp_path / "diverge.py"
    script.write_text(
        "import sys, torch\n"
        "from dpmix_dist.distributed import Distributed\n"
        "d = Distributed()\n"
        "d.check_identical(torch.ones(10), 'same')\n"
        "try:\n"
        "    d.check_identical(torch.ones(10) * (1 + d.rank * 1e-6), 'parameters')\n"
        "    result = 'NOT DETECTED'\n"
        "except RuntimeError as e:\n"
        "    result = f'DETECTED {e}'\n"
        f"open(f'{tmp_path}/rank{{d.rank}}.txt', 'w').write(result)\n"
        "d.close()\n"
    )
    proc = subprocess.run(
        accelerate_launch(2) + [str(script)], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):  # every rank sees the divergence, not only the one that differs
        assert (tmp_path / f"rank{rank}.txt").read_text().startswith("DETECTED parameters differ across ranks")


# ---------------------------------------------------------------------------------------------- a process is lost


@pytest.fixture(scope="module")
def killed(shards, tmp_path_factory) -> dict:
    """A 2-node run (one process per node, 127.0.0.1) whose main process is killed with SIGKILL once the first
    step checkpoint exists. Two launchers, so that no launcher ends the other rank for it: it must notice alone."""
    out, port = tmp_path_factory.mktemp("killed") / "run", free_port()
    nodes = [
        subprocess.Popen(
            _node_cmd(rank, "127.0.0.1", port)
            + _train_args(shards, out, out.parent / f"cache{rank}", "run.checkpoint_every_steps=2"),
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint.pt").exists():
            assert time.time() < deadline and all(n.poll() is None for n in nodes), "no checkpoint was written"
            time.sleep(0.01)
        (main_process,) = _workers(nodes[0])
        os.kill(main_process, signal.SIGKILL)
        killed_at = time.time()
        _, stderr = nodes[1].communicate(timeout=120)
        seconds = time.time() - killed_at
        nodes[0].communicate(timeout=60)
    finally:
        _kill(nodes)
    return {"out": out, "returncode": nodes[1].returncode, "stderr": stderr, "seconds": seconds}


def test_a_killed_rank_ends_the_others_with_a_clear_error(killed):
    out = killed["out"]
    assert killed["returncode"] != 0 and killed["seconds"] < 60  # gloo sees the closed sockets: no timeout needed
    message = next(line for line in killed["stderr"].splitlines() if line.startswith("error: "))
    assert "rank 1 of 2 lost the other processes during" in message
    assert f"with the same command plus --resume --output-dir {out}" in message
    assert not (out / "summary.json").exists() and (out / "checkpoint.pt").exists()
    assert (os.stat(out / "checkpoint.pt").st_mode & 0o777) == 0o600
    assert 2 <= torch.load(out / "checkpoint.pt", weights_only=False)["step"] < 15  # mid-run, step cadence


@pytest.mark.parametrize("world_size", [2, 1])
def test_a_killed_run_resumes_to_the_same_model_and_epsilon(
    killed, shards, reference, two_processes, tmp_path, world_size
):
    """The checkpoint is replicated (written whole by the main process), and sampling and noise depend on (seed,
    step) only: a resume may use another number of processes. Same W: bit for bit; another W: float tolerance."""
    out = tmp_path / "run"
    shutil.copytree(killed["out"], out)
    summary = _run(world_size, shards, out, "--resume")
    ref = json.loads((two_processes / "summary.json").read_text())
    assert summary["epsilon"] == ref["epsilon"] and summary["steps"] == ref["steps"]
    assert summary["world_size"] == world_size and not (out / "checkpoint.pt").exists()
    _assert_same_model(reference, out)
    if world_size == 2:
        _assert_identical_model(two_processes, out)
        assert summary["history"] == ref["history"]


def test_a_hung_rank_ends_the_others_within_the_collective_timeout(tmp_path):
    """A process that stops without closing its sockets (SIGSTOP: a frozen node, a cut cable) is seen only by the
    timeout: the other rank's next collective fails after collective_timeout_s, not torch's 30 minutes."""
    script = tmp_path / "hang.py"
    script.write_text(
        "import os, signal, sys, time, torch\n"
        "from dpmix_dist.distributed import Distributed\n"
        "from dpmix_dist.errors import run_command\n"
        "def body():\n"
        "    with Distributed(collective_timeout_s=5) as d:\n"
        "        d.all_reduce_sum(torch.ones(1))\n"
        "        if d.rank == 1:\n"
        "            os.kill(os.getpid(), signal.SIGSTOP)\n"
        f"        open('{tmp_path}/waiting', 'w').write(str(time.time()))\n"
        "        d.all_reduce_sum(torch.ones(1))\n"
        "sys.exit(run_command(body))\n"
    )
    port = free_port()
    nodes = [
        subprocess.Popen(
            _node_cmd(rank, "127.0.0.1", port) + [str(script)],
            cwd=REPO,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        _, stderr = nodes[0].communicate(timeout=180)
        waited = time.time() - float((tmp_path / "waiting").read_text())
    finally:
        _kill(nodes)
    assert nodes[0].returncode != 0
    assert "error: rank 0 of 2 lost the other processes during an all-reduce (Timed out" in stderr
    assert "the collective timeout (5 s, run.collective_timeout_s)" in stderr
    assert 5 <= waited < 60, waited


# ---------------------------------------------------------------------------------------------- a real network hop

NODE_ADDRESSES = ("10.213.0.1", "10.213.0.2")


@pytest.fixture
def two_network_namespaces():
    """Two network namespaces joined by a veth pair with NODE_ADDRESSES on that link only (and each its own
    loopback, which a node needs to reach its own address). Removed at the end, also when the test fails, with
    whatever still runs in them."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (ip netns add)")
    if shutil.which("ip") is None:
        pytest.skip("network namespaces need iproute2's ip command")
    tag = f"dpm{os.getpid()}"  # one test process's names: runs in parallel on one machine do not collide
    names, links = [f"{tag}n{i}" for i in (0, 1)], [f"{tag}v{i}" for i in (0, 1)]
    steps = [["ip", "netns", "add", name] for name in names]
    steps.append(["ip", "link", "add", links[0], "netns", names[0], "type", "veth", "peer", "name", links[1]])
    steps[-1] += ["netns", names[1]]
    for name, link, address in zip(names, links, NODE_ADDRESSES):
        steps.append(["ip", "-n", name, "addr", "add", f"{address}/24", "dev", link])
        steps += [["ip", "-n", name, "link", "set", dev, "up"] for dev in (link, "lo")]
    try:
        for step in steps:
            made = subprocess.run(step, capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(f"cannot make network namespaces here: {' '.join(step)}: {made.stderr.strip()}")
        yield list(zip(names, links, NODE_ADDRESSES))
    finally:
        for name in names:
            for pid in subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _link_bytes(namespace: str, link: str) -> int:
    stats = json.loads(subprocess.check_output(["ip", "-n", namespace, "-s", "-j", "link", "show", "dev", link]))
    return stats[0]["stats64"]["rx"]["bytes"]


def test_two_nodes_across_a_network_hop_match_one_process(
    shards, reference, two_processes, two_network_namespaces, tmp_path
):
    """One process per node, each in its own network namespace: the rendezvous and every all-reduce cross the veth
    link. GLOO_SOCKET_IFNAME binds gloo to it (the host name resolves to 127.0.0.1 here, which the other node
    cannot reach: without it the full mesh fails to connect)."""
    out, main_address = tmp_path / "run", NODE_ADDRESSES[0]
    procs = []
    for machine_rank, (namespace, link, _address) in enumerate(two_network_namespaces):
        cmd = ["ip", "netns", "exec", namespace, *_node_cmd(machine_rank, main_address, 29500)]  # a fresh port space
        cmd += _train_args(shards, out, tmp_path / f"cache{machine_rank}")
        env = _env() | {"GLOO_SOCKET_IFNAME": link}
        procs.append(
            subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    _assert_same_model(reference, out)
    _assert_identical_model(two_processes, out)
    # the gradients crossed the link: 15 all-reduces of 60,574 float32 sums at least
    assert _link_bytes(*two_network_namespaces[1][:2]) > 15 * 60_574 * 4
