"""Subscribes to a Sparkplug B feed and prints one JSON line per message, decoded by pysparkplug (its own code,
generated from the Eclipse Tahu sparkplug_b.proto): an independent decoder for tests/fleet/sparkplug.rs.

usage: sparkplug_sub.py HOST PORT USERNAME PASSWORD CLIENT_ID FILTER... [rebirth:TOPIC...]

Once subscribed it asks for a rebirth on each rebirth:TOPIC (an NCMD topic), as a Sparkplug host application does
when it starts after the edge nodes.
"""

import base64
import json
import sys

import paho.mqtt.client as mqtt
import pysparkplug as sp

host, port, user, password, client_id = sys.argv[1:6]
topic_filters = [a for a in sys.argv[6:] if not a.startswith("rebirth:")]
rebirths = [a[len("rebirth:"):] for a in sys.argv[6:] if a.startswith("rebirth:")]
births = {}


def plain(value):
    if isinstance(value, (bytes, bytearray)):
        return base64.b64encode(value).decode()
    return value


def metrics(msg):
    return [{"name": m.name, "datatype": m.datatype.name, "value": plain(m.value)} for m in msg.metrics]


def on_message(client, userdata, m):
    out = {"topic": m.topic, "qos": m.qos}
    try:
        t = sp.Topic.from_str(m.topic)
        out.update(group=t.group_id, node=t.edge_node_id, kind=t.message_type.name)
        if t.message_type == sp.MessageType.NBIRTH:
            msg = sp.NBirth.decode(m.payload)
            births[t.edge_node_id] = msg
            out.update(seq=msg.seq, timestamp=msg.timestamp, metrics=metrics(msg))
        elif t.message_type == sp.MessageType.NDATA:
            # Names and types of the data come from the node's birth, as a Sparkplug host application reads them.
            msg = sp.NData.decode(m.payload, birth=births.get(t.edge_node_id))
            out.update(seq=msg.seq, timestamp=msg.timestamp, metrics=metrics(msg))
        elif t.message_type == sp.MessageType.NDEATH:
            msg = sp.NDeath.decode(m.payload)
            out.update(timestamp=msg.timestamp, bd_seq=plain(msg.bd_seq_metric.value))
    except Exception as e:  # reported to the test, which fails on it
        out["error"] = repr(e)
    print(json.dumps(out), flush=True)


def on_connect(client, userdata, flags, rc, *rest):
    for f in topic_filters:
        client.subscribe(f, qos=1)
    now = sp.get_current_timestamp()
    rebirth = sp.Metric(timestamp=now, name="Node Control/Rebirth", datatype=sp.DataType.BOOLEAN, value=True)
    for t in rebirths:
        client.publish(t, sp.NCmd(timestamp=now, metrics=(rebirth,)).encode(include_dtypes=True), qos=0)


try:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION1, client_id=client_id, protocol=mqtt.MQTTv311)
except AttributeError:  # paho-mqtt 1.x
    client = mqtt.Client(client_id=client_id, protocol=mqtt.MQTTv311)
client.username_pw_set(user, password)
client.on_connect = on_connect
client.on_message = on_message
client.connect(host, int(port))
client.loop_forever()
