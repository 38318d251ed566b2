"""The generated Python code for protos/ is reproducible and up to date."""
import filecmp
import subprocess
import sys

from tests.conftest import REPO


def test_generated_code_is_not_stale(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "protos" / "generate.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*_pb2*.py*"))
    assert [str(p) for p in fresh] == ["tribune/v1/reward_pb2.py", "tribune/v1/reward_pb2.pyi",
                                       "tribune/v1/reward_pb2_grpc.py"]
    for rel in fresh:
        assert filecmp.cmp(tmp_path / rel, REPO / "protos" / rel, shallow=False), \
            f"protos/{rel} is stale: run `make proto` (python protos/generate.py) and commit the result"


def test_the_binding_names_are_in_the_proto():
    from tribune.v1 import reward_pb2

    req = reward_pb2.ScoreRequest.DESCRIPTOR
    assert req.fields_by_name["items"].number == 1
    item = reward_pb2.ScoreItem.DESCRIPTOR
    assert item.fields_by_name["prompt"].number == 1 and item.fields_by_name["response"].number == 2
    assert reward_pb2.ScoreResponse.DESCRIPTOR.fields_by_name["rewards"].number == 1
    service = reward_pb2.DESCRIPTOR.services_by_name["RewardService"]
    assert service.full_name == "tribune.v1.RewardService"
    assert {"Score", "ScoreBestOfN", "ScoreStream", "GetModelInfo"} <= set(service.methods_by_name)
