"""The PACS node against real parts, inside a private network namespace (``tests/test_pacs.py`` starts this
module under ``unshare -n``): a real Orthanc as the PACS, DCMTK's ``storescu``/``echoscu`` as the modality,
``fracdet``'s node in between. Ports are fixed: nothing else lives in this network."""

from __future__ import annotations

import io
import json
import os
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fracdet.dicom.node import OUT_OF_RESOURCES, SUCCESS, Destination, NodeConfig, PacsNode
from tests.conftest import SAMPLE
from tests.dicom_files import PHI, ct_slice, mono2_8bit, no_pixel_data, write_bytes

pytestmark = pytest.mark.skipif(os.environ.get("FRACDET_IN_NETNS") != "1", reason="runs inside tests/test_pacs.py")

ORTHANC_HTTP, ORTHANC_DICOM, NODE_PORT = 8042, 4242, 11112
PLUGINS = Path("/usr/share/orthanc/plugins")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """A real Orthanc with a temporary configuration and storage, stopped by its PID."""
    folder = tmp_path_factory.mktemp("orthanc")
    config = {
        "Name": "fracdet-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
        "HttpPort": ORTHANC_HTTP, "DicomPort": ORTHANC_DICOM, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
        "DicomModalities": {"fracdet": ["FRACDET", "127.0.0.1", NODE_PORT]},
        "Plugins": [str(p) for p in PLUGINS.glob("libOrthancDicomWeb.so")],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }  # fmt: skip
    (folder / "orthanc.json").write_text(json.dumps(config))
    log = (folder / "orthanc.log").open("w")
    process = subprocess.Popen(["Orthanc", str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                rest("/system")
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(
                        "Orthanc did not start: " + (folder / "orthanc.log").read_text()[-2000:]
                    ) from None
                time.sleep(0.2)
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


def rest(path: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{ORTHANC_HTTP}{path}", data=data),
                                timeout=10) as response:  # fmt: skip
        return json.loads(response.read())


def instances_of(study_uid: str) -> list[dict]:
    found = rest("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True})
    return [rest(f"/instances/{i['ID']}/simplified-tags") for i in found]


@pytest.fixture(scope="module")
def model():
    from fracdet.models import PreprocessCfg, TrainedModel, create_model

    thresholds = {"0.5": 0.5, "sens90": 0.01, "spec95": 0.02}
    return TrainedModel(module=create_model("localiser_lite0").eval(), name="tiny-localiser", arch="localiser_lite0",
                        preprocess=PreprocessCfg(64), thresholds=thresholds, threshold=0.01,
                        operating_point="sens90", meta={"version": "0.0.1"})  # fmt: skip


@pytest.fixture(scope="module")
def grey():
    return np.asarray(Image.open(SAMPLE / "images/Fractured/IMG0000261.jpg").convert("L"))


def radiograph(grey, study: str, instance: str, **attributes) -> bytes:
    from pydicom import dcmread

    ds = dcmread(io.BytesIO(write_bytes(mono2_8bit(grey))))
    ds.StudyInstanceUID, ds.SOPInstanceUID = study, instance
    ds.file_meta.MediaStorageSOPInstanceUID = instance
    ds.SeriesInstanceUID = study + ".1"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return write_bytes(ds)


def config(spool: Path, **overrides) -> NodeConfig:
    base = {"spool": spool, "allowed_callers": ("STORESCU", "ORTHANC", "TESTSCU"), "port": NODE_PORT,
            "send_to": Destination("ORTHANC", "127.0.0.1", ORTHANC_DICOM)}  # fmt: skip
    return NodeConfig(**{**base, **overrides})


def dcmtk(tool: str, *args: str, calling: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run([tool, "-aet", calling, "-aec", "FRACDET", "127.0.0.1", str(NODE_PORT), *args],
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip


def scu_store(datasets: list[bytes]) -> list[int]:
    """C-STORE each file over one association from a pynetdicom SCU; the statuses."""
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(DigitalXRayImageStorageForPresentation)
    assoc = ae.associate("127.0.0.1", NODE_PORT, ae_title="FRACDET")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(dcmread(io.BytesIO(data))).Status) for data in datasets]
    finally:
        assoc.release()


def test_a_stored_radiograph_comes_back_as_sr_gsps_and_sc_in_the_pacs(orthanc, model, grey, tmp_path, caplog):
    import logging

    caplog.set_level(logging.INFO)  # what a deployed node logs: no identifier may be in it
    study = "1.2.826.0.1.3680043.8.498.901"
    (tmp_path / "x.dcm").write_bytes(radiograph(grey, study, study + ".1.1"))
    with PacsNode(model, config(tmp_path / "spool")) as node:
        assert dcmtk("echoscu").returncode == 0
        sent = dcmtk("storescu", str(tmp_path / "x.dcm"))
        assert sent.returncode == 0, sent.stderr
        assert node.wait_idle(120)
    results = [i for i in instances_of(study) if i.get("Manufacturer") == "fracdet"]
    assert sorted(i["Modality"] for i in results) == ["OT", "PR", "SR"]
    assert len({i["SeriesInstanceUID"] for i in results}) == 1  # one new series in the original study
    assert len(list((tmp_path / "spool" / "done").iterdir())) == 1 and node.stats.quarantined == 0
    assert "study " in caplog.text and study not in caplog.text
    assert not any(value in caplog.text for key, value in PHI.items() if key != "StudyInstanceUID")


def test_bad_datasets_and_an_aborted_association_are_survived(orthanc, model, grey, tmp_path):
    from pydicom import dcmread
    from pynetdicom import AE
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    broken = dcmread(io.BytesIO(write_bytes(mono2_8bit(grey))))
    broken.PixelData = broken.PixelData[:1000]  # malformed: far fewer pixels than its rows and columns
    ct = dcmread(io.BytesIO(write_bytes(ct_slice(grey))))
    ct.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # sent as DX, but it says CT
    empty = dcmread(io.BytesIO(write_bytes(no_pixel_data(grey))))
    empty.Modality = "DX"
    for k, ds in enumerate((broken, ct, empty)):  # three different images (one UID each)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.990.{k}"
    with PacsNode(model, config(tmp_path / "spool")) as node:
        statuses = scu_store([write_bytes(broken), write_bytes(ct), write_bytes(empty)])
        assert statuses == [SUCCESS] * 3  # accepted: judged later, never inside the association
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation)
        assoc = ae.associate("127.0.0.1", NODE_PORT, ae_title="FRACDET")
        assert assoc.is_established
        assoc.abort()  # a modality that dies mid-association
        assert node.wait_idle(60)
        assert dcmtk("echoscu").returncode == 0  # still serving
        good = "1.2.826.0.1.3680043.8.498.902"
        (tmp_path / "good.dcm").write_bytes(radiograph(grey, good, good + ".1.1"))
        assert dcmtk("storescu", str(tmp_path / "good.dcm")).returncode == 0
        assert node.wait_idle(120)
    files = sorted((tmp_path / "spool" / "quarantine").glob("*.reason.txt"))
    reasons = [p.read_text() for p in files]
    assert len(reasons) == 3
    assert not any(p.name.removesuffix(".reason.txt") in r for p, r in zip(files, reasons, strict=True))  # said once
    assert any("truncated" in r or "damaged" in r for r in reasons) and any("CT" in r for r in reasons)
    assert any("no Pixel Data" in r for r in reasons)
    assert not any(value in " ".join(reasons) for value in PHI.values())
    assert len([i for i in instances_of(good) if i.get("Manufacturer") == "fracdet"]) == 3


def test_a_deflated_store_is_read_no_further_than_its_header_inside_the_association(orthanc, model, grey, tmp_path,
                                                                                    monkeypatch):  # fmt: skip
    """A deflated dataset (PS3.5 A.5) is a thousandth of what it inflates to; pynetdicom's own decoding inflates
    it whole inside the association. The node reads its header alone there, and the workers decode it within
    the pixel limit, as every image."""
    import tracemalloc

    from pydicom import dcmread
    from pydicom.uid import DeflatedExplicitVRLittleEndian
    from pynetdicom import AE, _config
    from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation

    study = "1.2.826.0.1.3680043.8.498.911"
    ds = dcmread(io.BytesIO(radiograph(grey, study, study + ".1.1")))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.add_new(0x00091010, "OB", bytes(128 << 20))  # 128 MiB of zeros ahead of the pixels: 0.5 MB deflated
    (tmp_path / "deflated.dcm").write_bytes(write_bytes(ds))
    del ds
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # sent as the file holds it
    hold = threading.Event()
    with PacsNode(model, config(tmp_path / "spool"), hold=hold) as node:
        ae = AE(ae_title="TESTSCU")
        ae.add_requested_context(DigitalXRayImageStorageForPresentation, [DeflatedExplicitVRLittleEndian])
        tracemalloc.start()
        try:
            assoc = ae.associate("127.0.0.1", NODE_PORT, ae_title="FRACDET")
            assert assoc.is_established
            status = int(assoc.send_c_store(tmp_path / "deflated.dcm").Status)
            assoc.release()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert status == SUCCESS
        assert peak < 48 << 20  # inflated whole, it took more than 128 MiB
        hold.set()
        assert node.wait_idle(120)
    assert len([i for i in instances_of(study) if i.get("Manufacturer") == "fracdet"]) == 3


def test_a_full_queue_answers_out_of_resources_and_nothing_is_lost(orthanc, model, grey, tmp_path):
    hold = threading.Event()  # the workers wait: images stay queued
    study = "1.2.826.0.1.3680043.8.498.903"
    files = [radiograph(grey, study, f"{study}.1.{k}") for k in range(3)]
    with PacsNode(model, config(tmp_path / "spool", queue_size=2), hold=hold) as node:
        assert scu_store(files) == [SUCCESS, SUCCESS, OUT_OF_RESOURCES]
        assert node.stats.refused_full == 1
        hold.set()
        assert node.wait_idle(180)
    assert len([i for i in instances_of(study) if i.get("Manufacturer") == "fracdet"]) == 6  # 2 images x 3


def test_an_image_sent_twice_is_analysed_once_even_across_a_restart(orthanc, model, grey, tmp_path):
    study = "1.2.826.0.1.3680043.8.498.907"
    image = radiograph(grey, study, study + ".1.1")
    with PacsNode(model, config(tmp_path / "spool")) as node:
        assert scu_store([image, image]) == [SUCCESS, SUCCESS]  # a PACS retrying a store it thought failed
        assert node.wait_idle(120)
        assert node.stats.duplicates == 1 and node.stats.analysed == 1
    with PacsNode(model, config(tmp_path / "spool")) as node:
        assert scu_store([image]) == [SUCCESS]
        assert node.wait_idle(60) and node.stats.duplicates == 1 and node.stats.analysed == 0
    assert len([i for i in instances_of(study) if i.get("Manufacturer") == "fracdet"]) == 3


def test_a_restarted_node_analyses_what_it_had_spooled(orthanc, model, grey, tmp_path):
    study = "1.2.826.0.1.3680043.8.498.904"
    hold = threading.Event()
    with PacsNode(model, config(tmp_path / "spool"), hold=hold):
        assert scu_store([radiograph(grey, study, study + ".1.1")]) == [SUCCESS]
    assert len(list((tmp_path / "spool" / "queue").glob("*.dcm"))) == 1  # stopped before analysing it
    with PacsNode(model, config(tmp_path / "spool")) as node:
        assert node.wait_idle(120)
    assert len([i for i in instances_of(study) if i.get("Manufacturer") == "fracdet"]) == 3
    assert not list((tmp_path / "spool" / "queue").iterdir())


def test_unknown_callers_are_rejected_and_its_own_results_are_not_analysed_again(orthanc, model, grey, tmp_path):
    assert dcmtk("echoscu", calling="INTRUDER").returncode != 0
    study = "1.2.826.0.1.3680043.8.498.905"
    with PacsNode(model, config(tmp_path / "spool")) as node:
        assert scu_store([radiograph(grey, study, study + ".1.1")]) == [SUCCESS]
        assert node.wait_idle(120)
        ours = [i for i in instances_of(study) if i.get("Manufacturer") == "fracdet"]
        assert len(ours) == 3
        for instance in rest("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study}}):
            rest("/modalities/fracdet/store", {"Resources": [instance], "Synchronous": True})  # routed back
        assert node.wait_idle(120)
        assert node.stats.ignored_own == 3 and node.stats.analysed == 1  # only the radiograph was analysed
    assert len([i for i in instances_of(study) if i.get("Manufacturer") == "fracdet"]) == 3  # no results of results


def test_pull_analyses_a_study_in_the_pacs_over_dicomweb_and_stores_the_results_back(orthanc, model, grey):
    from fracdet.data.dicom import keyed_hash
    from fracdet.dicom.dicomweb import DicomWeb
    from fracdet.dicom.pull import pull

    study = "1.2.826.0.1.3680043.8.498.906"
    for k in (1, 2):
        data = radiograph(grey, study, f"{study}.1.{k}", StudyDate="20261128")
        request = urllib.request.Request(f"http://127.0.0.1:{ORTHANC_HTTP}/instances", data=data)
        urllib.request.urlopen(request, timeout=10).close()
    with DicomWeb(f"http://127.0.0.1:{ORTHANC_HTTP}/dicom-web") as server:
        table = pull(server, model, study=study)
        assert len(table) == 2 and table["error"].isna().all() and set(table["study"]) == {keyed_hash(study)}
        assert len([i for i in instances_of(study) if i.get("Manufacturer") == "fracdet"]) == 6
        again = pull(server, model, since="2026-11-28")  # its own results are in the study now: not analysed
        assert len([i for i in instances_of(study) if i.get("Manufacturer") == "fracdet"]) == 6  # nor filed twice
        assert again["error"].isna().all()  # stored again as the same instances: the PACS takes them
    assert len(again[again["study"] == keyed_hash(study)]) == 2
    assert study not in again.to_csv()


def test_the_listen_command_serves_dcmtk_sends_by_stow_rs_and_stops_on_sigterm(orthanc, model, grey, tmp_path):
    import signal
    import socket
    import sys

    from fracdet.models import save_model

    save_model(model, tmp_path / "model")
    study = "1.2.826.0.1.3680043.8.498.908"
    (tmp_path / "x.dcm").write_bytes(radiograph(grey, study, study + ".1.1"))
    command = [sys.executable, "-m", "fracdet.cli", "pacs", "listen", "--allow", "STORESCU", "--port", str(NODE_PORT),
               "--stow", f"http://127.0.0.1:{ORTHANC_HTTP}/dicom-web", "--spool", str(tmp_path / "spool"),
               "--model", str(tmp_path / "model")]  # fmt: skip
    listener = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # until it listens
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", NODE_PORT)) == 0:
                    break
            assert listener.poll() is None and time.monotonic() < deadline, listener.stdout.read()
            time.sleep(0.2)
        sent = dcmtk("storescu", str(tmp_path / "x.dcm"))
        assert sent.returncode == 0, sent.stderr
        deadline = time.monotonic() + 120
        while len([i for i in instances_of(study) if i.get("Manufacturer") == "fracdet"]) < 3:
            assert time.monotonic() < deadline, "no results arrived by STOW-RS"
            time.sleep(0.5)
    finally:
        listener.send_signal(signal.SIGTERM)
        output, _ = listener.communicate(timeout=60)
    assert listener.returncode == 0, output
    assert study not in output and PHI["PatientName"] not in output


def test_an_archive_manifest_of_dicomweb_urls_is_scored_on_a_dask_cluster(orthanc, grey, tmp_path):
    pytest.importorskip("distributed", reason='needs the archive extra: pip install "fracdet[archive]"')
    import pandas as pd

    from fracdet.dicom.pull import read_instance
    from fracdet.inference import Predictor
    from fracdet.inference.archive import predict_archive
    from fracdet.models import load

    study, root = "1.2.826.0.1.3680043.8.498.907", f"http://127.0.0.1:{ORTHANC_HTTP}/dicom-web"
    urls = []
    for k in (1, 2, 3):
        data = radiograph(grey[: 400 + 50 * k], study, f"{study}.1.{k}")  # three different radiographs
        urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{ORTHANC_HTTP}/instances", data=data),
                               timeout=10).close()  # fmt: skip
        urls.append(f"{root}/studies/{study}/series/{study}.1/instances/{study}.1.{k}")
    urls.append(f"{root}/studies/{study}/series/{study}.1/instances/{study}.1.99")  # not in the PACS
    result = predict_archive("fracatlas-default", urls, tmp_path / "rows", workers=1, partition_size=2,
                             reader=read_instance)  # fmt: skip
    assert (result.partitions, result.scored) == (2, 2)
    rows = pd.read_parquet(tmp_path / "rows")
    expected = Predictor(load("fracatlas-default"), heatmaps=False).predict_files(urls, reader=read_instance)
    assert rows["path"].tolist() == urls and rows["label"][:3].tolist() == expected["label"][:3].tolist()
    np.testing.assert_allclose(rows["probability"][:3], expected["probability"][:3], atol=2e-6)
    assert rows["boxes"][:3].tolist() == expected["boxes"][:3].tolist()
    # Each instance scored as itself: the crops' boxes differ (their probabilities need not, for an obvious
    # fracture, to the precision an int8 graph keeps).
    assert rows["error"][:3].isna().all() and rows["boxes"][:3].nunique() == 3
    assert "HTTP 404" in rows["error"][3] and study not in rows["error"][3]  # no identifier in the message
