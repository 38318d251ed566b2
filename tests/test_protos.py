"""protos/: the generated Python code is reproducible and up to date; the API passes lint and the
breaking-change check against the committed snapshot; the wheel ships the .proto files."""
import filecmp
import json
import shutil
import subprocess
import sys

from tests.conftest import REPO, copy_source


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


def _api_check():
    import importlib.util

    spec = importlib.util.spec_from_file_location("api_check", REPO / "protos" / "api_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protos_are_lint_clean_and_compatible_with_the_committed_snapshot():
    api = _api_check()
    assert api.check() == []
    # the snapshot holds the binding names of the design card
    snap = json.loads((REPO / "protos" / "api_snapshot.json").read_text())
    assert snap["messages"]["tribune.v1.ScoreItem"]["response"] == {"number": 2, "type": "string", "label": "optional"}
    assert snap["services"]["tribune.v1.RewardService"]["ScoreStream"]["client_streaming"] is True


def test_a_deliberately_broken_copy_fails_the_check(tmp_path):
    api = _api_check()
    shutil.copytree(REPO / "protos" / "tribune", tmp_path / "tribune", ignore=shutil.ignore_patterns("*.py*"))
    proto = tmp_path / "tribune" / "v1" / "reward.proto"
    text = proto.read_text()
    for old, new in (("string response = 2;", "string response = 7;"),         # renumbered
                     ("repeated float rewards = 1;", "repeated double rewards = 1;"),   # retyped
                     ("  string request_id = 2;\n", ""),                         # removed (ScoreRequest)
                     ("rpc ScoreBestOfN(BestOfNRequest)", "rpc scoreBestOfN(BestOfNRequest)"),  # renamed, bad style
                     ("int32 max_items = 7;", "int32 maxItems = 7;")):           # renamed, bad style
        assert old in text, old
        text = text.replace(old, new, 1)
    proto.write_text(text)
    problems = api.check(tmp_path, REPO / "protos" / "api_snapshot.json")
    expected = ["tribune.v1.ScoreItem.response: number changed from 2 to 7",
                "tribune.v1.ScoreResponse.rewards: type changed from float to double",
                "tribune.v1.ScoreRequest.request_id (field 2) removed",
                "tribune.v1.RewardService.ScoreBestOfN removed",
                "tribune.v1.ModelInfo.max_items (field 7) renamed to maxItems",
                "tribune.v1.RewardService.scoreBestOfN: method names must be PascalCase",
                "tribune.v1.ModelInfo.maxItems: field names must be lower_snake_case"]
    assert sorted(problems) == sorted(expected), problems
    # an added field is compatible
    proto.write_text(proto.read_text().replace("  repeated float ensemble_spread = 5;\n",
                                               "  repeated float ensemble_spread = 5;\n  string note = 6;\n"))
    assert "tribune.v1.ScoreResponse.note" not in " ".join(api.check(tmp_path, REPO / "protos" / "api_snapshot.json"))


def test_the_wheel_ships_the_proto_files(tmp_path):
    """Clients in other languages generate from the .proto; it is installed with the package."""
    import zipfile

    src = copy_source(tmp_path / "src")
    proc = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                           "print(b.build_wheel(sys.argv[1]))", str(tmp_path / "dist")],
                          cwd=src, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = tmp_path / "dist" / proc.stdout.split()[-1]
    names = zipfile.ZipFile(wheel).namelist()
    protos = sorted(p.relative_to(REPO / "protos").as_posix() for p in (REPO / "protos").rglob("*.proto"))
    assert protos and set(protos) <= set(names), (protos, [n for n in names if n.startswith("tribune/")])
