"""Clients simulated on one machine keep one copy of a file they were all sent: each client's
storage holds a hard link to the machine's copy (the scale run's 80 clients held 21 GB of
the same model before)."""

import hashlib

from flwr.app import Context, Message, Metadata, RecordDict

from fedsoda.federated import client_app
from fedsoda.federated.messages import blobs_record


def deliver_to(partition: int, files: dict) -> None:
    context = Context(run_id=1, node_id=partition + 1, node_config={"partition-id": partition},
                      state=RecordDict(), run_config={})
    metadata = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=partition + 1,
                        reply_to_message_id="", group_id="", created_at=0.0, ttl=3600.0,
                        message_type="query.deliver")
    client_app.deliver(Message(RecordDict({"files": blobs_record(files)}), metadata=metadata),
                       context)


def test_clients_on_one_machine_share_one_copy_of_a_delivered_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSODA_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "model.safetensors"
    source.write_bytes(b"weights" * 1000)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    for partition in (0, 1, 2):
        deliver_to(partition, {digest: source})
    deliver_to(1, {digest: source})  # a second delivery of the same file changes nothing
    held = [client_app.blob_path(client_app.node_storage(k), digest) for k in (0, 1, 2)]
    shared = client_app.machine_blob(digest)
    assert shared.read_bytes() == source.read_bytes()
    assert {path.stat().st_ino for path in held} == {shared.stat().st_ino}
    assert shared.stat().st_nlink == 4  # the machine's copy and three clients' links
    assert not list(shared.parent.glob("*.partial"))
    assert not [p for path in held for p in path.parent.glob("*.partial")]
