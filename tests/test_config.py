"""Profiles, overrides and the data-folder message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from cxr_model.config import PROFILES, TrainConfig, load_config
from cxr_model.errors import DataError, ServerError


def test_profiles_load_and_overrides_win() -> None:
    for name in PROFILES:
        assert load_config(name).profile == name
    cfg = load_config("smoke", epochs=3, max_trials=None, data_dir="~/x")
    assert cfg.epochs == 3 and cfg.max_trials == PROFILES["smoke"]["max_trials"]
    assert cfg.data_dir == Path("~/x").expanduser()


def test_bad_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="Unknown profile"):
        load_config("huge")
    with pytest.raises(ValidationError):
        load_config("smoke", val_fraction=0.9)
    with pytest.raises(ValidationError):
        load_config("smoke", no_such_setting=1)


@pytest.mark.parametrize(("setting", "message"), [
    (dict(search_blocks=(5, 3)), "search_blocks=(5, 3) needs 1 <= min <= max"),
    (dict(search_blocks=(0, 3)), "search_blocks"),
    (dict(search_convs_per_block=(2, 1)), "search_convs_per_block"),
    (dict(search_dropout=(0.5, 0.2)), "search_dropout"),
    (dict(search_dropout=(0.2, 1.0)), "search_dropout"),
    (dict(search_learning_rate=(0.0, 0.1)), "log scale"),
    (dict(search_learning_rate=(1e-2, 1e-3)), "search_learning_rate"),
    (dict(search_filters=()), "search_filters"),
    (dict(search_filters=(16, 0)), "search_filters"),
    (dict(search_dense_units=(-1, 64)), "search_dense_units"),
])
def test_a_search_space_the_tuner_cannot_sample_is_rejected_up_front(setting: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        load_config("smoke", **setting)
    load_config("smoke", search_blocks=(4, 4), search_dropout=(0.0, 0.0), search_dense_units=(0,))  # degenerate, fine


def test_missing_data_dir_explains_where_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CXR_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="paultimothymooney/chest-xray-pneumonia.*CXR_DATA_DIR"):
        load_config("smoke").resolved_data_dir()


def test_env_var_points_at_data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path))
    assert load_config("smoke").resolved_data_dir() == tmp_path.resolve()
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "nope"))
    with pytest.raises(DataError, match="does not exist"):
        load_config("smoke").resolved_data_dir()


def test_work_dir_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXR_WORK_DIR", str(tmp_path))
    cfg = load_config("smoke")
    assert cfg.cache_dir == tmp_path / "cache" and cfg.tuner_dir == tmp_path / "tuner"
    assert TrainConfig().work_dir == tmp_path  # a config built without load_config reads it too
    monkeypatch.delenv("CXR_WORK_DIR")
    assert TrainConfig().work_dir == Path("work")


def test_a_deployments_parameters_get_their_profile_and_the_workers_work_dir(monkeypatch: pytest.MonkeyPatch,
                                                                            tmp_path: Path) -> None:
    """A Prefect deployment hands the flow a dict of parameters, which Prefect validates into a TrainConfig:
    {"profile": "smoke"} must mean the smoke profile (not a tag on the defaults), and the work folder must be the
    one CXR_WORK_DIR names on the worker that runs it."""
    from cxr_pneumonia.flows.train_flow import train_flow

    monkeypatch.setenv("CXR_WORK_DIR", str(tmp_path / "shared-work"))
    cfg = train_flow.validate_parameters({"cfg": {"profile": "smoke", "epochs": 3}})["cfg"]
    assert isinstance(cfg, TrainConfig)
    assert cfg == load_config("smoke", epochs=3)
    assert cfg.image_size == PROFILES["smoke"]["image_size"] and cfg.work_dir == tmp_path / "shared-work"
    assert train_flow.validate_parameters({"cfg": {}})["cfg"] == load_config("default")
    assert TrainConfig(max_trials=9) == load_config("default", max_trials=9)
    # a config that went out as JSON comes back the same, whatever the environment where it is read
    sent = load_config("full", seed=3).model_dump(mode="json")
    monkeypatch.setenv("CXR_WORK_DIR", str(tmp_path / "elsewhere"))
    assert TrainConfig.model_validate(sent) == load_config("full", seed=3, work_dir=tmp_path / "shared-work")
    with pytest.raises(ValidationError, match="Unknown profile"):
        TrainConfig(profile="huge")
    with pytest.raises(ValidationError, match="frozen"):
        cfg.profile = "full"  # would re-tag without refilling


def test_every_augmentation_range_has_a_cli_flag_that_reaches_the_config() -> None:
    import inspect

    from cxr_model.augmentation import build_augmentation
    from cxr_model.config import AUGMENTATION_FIELDS
    from cxr_pneumonia.cli import build_parser, train_overrides

    assert set(AUGMENTATION_FIELDS) == set(inspect.signature(build_augmentation).parameters) - {"seed"}
    argv = ["train", "--profile", "smoke"] + [arg for i, name in enumerate(AUGMENTATION_FIELDS)
                                              for arg in (f"--{name}", str(0.01 * (i + 1)))]
    params = load_config("smoke", **train_overrides(build_parser().parse_args(argv))).augmentation_params()
    expected = [0.01 * (i + 1) for i in range(len(AUGMENTATION_FIELDS))]
    assert [params[name] for name in AUGMENTATION_FIELDS] == pytest.approx(expected)
    build_augmentation(**params)  # every field is an argument of the augmentation


def test_head_threshold_rule_budget_snapshot_and_member_flags_reach_the_config() -> None:
    from cxr_pneumonia.cli import build_parser, train_overrides

    argv = ["train", "--profile", "default", "--head", "flatten", "--threshold-rule", "margin", "--train-minutes", "0",
            "--snapshots", "2", "--members", "3", "--intensity", "equalize",
            "--balanced-sampling", "--mixup", "0.3", "--block", "residual",
            "--antialias", "stem", "--top-trials", "2", "--class-weights", "--weight-decay", "0.05"]
    cfg = load_config("default", **train_overrides(build_parser().parse_args(argv)))
    assert cfg.head == "flatten" and cfg.search_space_params()["fixed"]["head"] == "flatten"
    assert cfg.search_space_params()["fixed"]["intensity"] == "equalize"
    assert cfg.search_space_params()["fixed"]["block"] == "residual" and load_config("default").block == "plain"
    assert cfg.search_space_params()["fixed"]["antialias"] == "stem" and load_config("default").antialias == "none"
    assert load_config("default").intensity == "standardize"
    assert cfg.balanced_sampling and not load_config("default").balanced_sampling
    assert cfg.mixup == 0.3 and load_config("default").mixup == 0
    assert cfg.class_weights and not load_config("default").class_weights and not load_config("full").class_weights
    assert cfg.search_space_params()["fixed"]["weight_decay"] == 0.05 and load_config("default").weight_decay == 0
    off = build_parser().parse_args(["train", "--no-class-weights"])
    assert train_overrides(off)["class_weights"] is False
    assert cfg.threshold_rule == "margin"
    assert cfg.train_minutes == 0  # 0 lifts the default profile's budget (None would be ignored as "not given")
    assert load_config("default").train_minutes == 10 and load_config("default").threshold_rule == "stressed_margin"
    assert cfg.snapshots == 2 and load_config("default").snapshots == 1  # the best epoch alone unless asked
    assert cfg.members == 3 and load_config("default").members == 1 and load_config("full").members == 1
    assert load_config("full").top_trials == 3  # the full profile averages its search's three best networks
    assert not load_config("full").train_minutes  # the full profile trains its members to the end
    with pytest.raises(ValidationError):
        load_config("default", train_minutes=-1)
    with pytest.raises(ValidationError):
        load_config("default", snapshots=0)
    with pytest.raises(ValidationError):
        load_config("default", members=0)
    assert cfg.top_trials == 2 and load_config("default").top_trials == 1
    with pytest.raises(ValidationError, match="at least as many search trials"):
        load_config("default", top_trials=7)  # the default searches 6 trials
    assert load_config("default", top_trials=7, tuner="hyperband").top_trials == 7  # hyperband sizes itself
    with pytest.raises(ValidationError):
        load_config("default", intensity="clahe")


def test_cli_rejects_bad_settings_with_a_clear_message(capsys) -> None:
    from cxr_pneumonia.cli import build_parser

    for argv, message in ((["--zoom", "0.9"], "error: --zoom: Input should be less than or equal to 0.5"),
                          (["--top-trials", "7"], "needs at least as many search trials (max_trials=6)")):
        args = build_parser().parse_args(["train", "--profile", "default", *argv])
        assert args.func(args) == 2  # before any data is read or any server starts
        assert message in capsys.readouterr().err


def test_search_state_key_follows_what_a_trial_score_depends_on() -> None:
    """`--resume` continues a search only where its finished trials were scored under the same settings."""
    base = load_config("smoke")
    key = base.search_state_key()
    assert key == load_config("smoke").search_state_key()  # stable across processes: a digest, not hash()
    # a finished search can be extended, and what follows the search does not matter to it
    for same in (dict(max_trials=5), dict(epochs=7), dict(threshold_rule="youden"), dict(experiment_name="x"),
                 dict(schedule="cosine")):
        assert load_config("smoke", **same).search_state_key() == key, same
    # but every setting that changes how a trial trains or what it is scored on starts a new search
    for other in (dict(class_weights=True), dict(zoom=0.1), dict(seed=7), dict(val_fraction=0.2),
                  dict(search_fraction=0.5), dict(search_epochs=3), dict(image_size=96), dict(weight_decay=0.05),
                  dict(ema=0.99), dict(optimizer="sgd"), dict(search_filters=(16,)), dict(balanced_sampling=True),
                  dict(batch_size=8), dict(max_per_class=7), dict(patience=9), dict(augment=False)):
        assert load_config("smoke", **other).search_state_key() != key, other


def test_train_flags_are_derived_from_the_config_fields() -> None:
    """Each TrainConfig field is a `cxr train` flag with the field's type, choices and description as its help."""
    from cxr_pneumonia.cli import build_parser, flag, train_overrides

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith(" train"))
    actions = {a.dest: a for a in train._actions}
    for name, info in TrainConfig.model_fields.items():
        if name != "profile":
            assert actions[name].option_strings[0] == flag(name) and actions[name].help == info.description, name
    assert actions["tta"].choices == ["none", "scale", "aspect", "scale+aspect"]
    assert actions["search_blocks"].nargs == 2 and actions["search_filters"].nargs == "+"
    args = parser.parse_args(["train"])
    assert set(train_overrides(args)) == set(TrainConfig.model_fields) - {"profile"}
    assert all(v is None for v in train_overrides(args).values())  # a flag left out leaves the field to the profile
    argv = ["train", "--search-blocks", "2", "4", "--search-filters", "8", "16", "--search-convs-per-block", "1", "1",
            "--search-dropout", "0.2", "0.3", "--search-dense-units", "0", "--search-learning-rate", "1e-4", "1e-3",
            "--champion-metric", "pr_auc", "--no-augment", "--max-per-class", "5", "--work-dir", "/tmp/w"]
    cfg = load_config("smoke", **train_overrides(parser.parse_args(argv)))
    space = cfg.search_space_params()
    assert space["blocks"] == (2, 4) and space["filters"] == (8, 16) and space["convs_per_block"] == (1, 1)
    assert space["dropout"] == (0.2, 0.3) and space["dense_units"] == (0,) and space["learning_rate"] == (1e-4, 1e-3)
    assert cfg.champion_metric == "pr_auc" and load_config("smoke").champion_metric == "roc_auc"
    assert cfg.augment is False and cfg.max_per_class == 5 and cfg.work_dir == Path("/tmp/w")
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--tta", "sideways"])


def test_the_default_search_space_is_the_config_fields_defaults() -> None:
    from cxr_model.search import SPACE_FIELDS, SearchSpace, default_space

    space = default_space()
    for name in SPACE_FIELDS:
        assert getattr(space, name) == TrainConfig.model_fields[f"search_{name}"].default
    cfg = load_config("default")
    assert SearchSpace.from_config(cfg).convs_per_block == cfg.search_convs_per_block == (1, 1)  # the profile's


def _layout(root: Path, splits=("train", "test")) -> Path:
    for split in splits:
        for name in ("NORMAL", "PNEUMONIA"):
            (root / split / name).mkdir(parents=True)
    return root


def test_cli_stops_before_any_server_or_image_on_a_bad_layout_or_an_unreachable_tracking_server(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import socket

    from cxr_pneumonia.cli import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(tmp_path / "never.db"))
    partial = _layout(tmp_path / "partial", splits=("train",))
    assert main(["train", "--profile", "smoke", "--data-dir", str(partial)]) == 2
    assert "Missing split folder" in capsys.readouterr().err

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    data = _layout(tmp_path / "data")
    assert main(["train", "--profile", "smoke", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"MLflow tracking server http://127.0.0.1:{port} does not answer" in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(tmp_path / "never.db"))
    monkeypatch.setenv("PREFECT_API_URL", f"http://127.0.0.1:{port}/api")
    assert main(["train", "--profile", "smoke", "--data-dir", str(data)]) == 2
    assert f"Prefect API http://127.0.0.1:{port}/api does not answer" in capsys.readouterr().err
    monkeypatch.delenv("PREFECT_API_URL")

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(tmp_path / "never.db"))
    assert main(["train", "--profile", "smoke", "--data-dir", str(data),
                 "--result-json", str(tmp_path / "no" / "such" / "r.json")]) == 2
    assert "--result-json: folder" in capsys.readouterr().err
    assert main(["train", "--profile", "smoke", "--data-dir", str(data), "--search-blocks", "5", "3"]) == 2
    assert "search_blocks=(5, 3) needs 1 <= min <= max" in capsys.readouterr().err
    assert not (tmp_path / "never.db").exists()  # nothing was started


def test_a_tracking_server_that_answers_at_all_counts_as_reachable() -> None:
    """An auth proxy may refuse /health: any HTTP answer means the server is there."""
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from cxr_pneumonia.checks import check_tracking_server

    class Refuse(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        check_tracking_server(f"http://127.0.0.1:{server.server_address[1]}")
        check_tracking_server("sqlite:///mlflow.db")  # local stores are not checked
    finally:
        server.shutdown()


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1, signed by itself: a server with a private certificate authority."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "server.pem", folder / "server.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_a_tls_tracking_server_is_checked_as_the_mlflow_client_checks_it(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A server behind a private certificate authority is reachable once MLFLOW_TRACKING_SERVER_CERT_PATH names
    it (or MLFLOW_TRACKING_INSECURE_TLS is set), and a failed handshake says TLS, not "does not answer"."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from cxr_pneumonia.checks import check_tracking_server

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    cert, key = _self_signed_certificate(tmp_path)
    server = HTTPServer(("127.0.0.1", 0), Healthy)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"https://127.0.0.1:{server.server_address[1]}"
    for name in ("MLFLOW_TRACKING_SERVER_CERT_PATH", "MLFLOW_TRACKING_INSECURE_TLS"):
        monkeypatch.delenv(name, raising=False)
    try:
        with pytest.raises(ServerError, match="TLS handshake failed.*MLFLOW_TRACKING_SERVER_CERT_PATH"):
            check_tracking_server(uri)
        monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(cert))
        check_tracking_server(uri)
        monkeypatch.delenv("MLFLOW_TRACKING_SERVER_CERT_PATH")
        monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
        check_tracking_server(uri)
    finally:
        server.shutdown()
