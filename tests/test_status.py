import orjson

from fastproxy.status import status_response


def split(response: bytes):
    head, body = response.split(b"\r\n\r\n", 1)
    return head.split(b"\r\n"), orjson.loads(body)


def test_status_response_is_a_kubernetes_status():
    lines, body = split(status_response(403, 'pods is forbidden: "x"'))
    assert lines[0] == b"HTTP/1.1 403 Forbidden"
    assert b"Content-Type: application/json" in lines
    assert f"Content-Length: {len(orjson.dumps(body))}".encode() in lines
    assert body == {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": 'pods is forbidden: "x"', "reason": "Forbidden", "code": 403}


def test_status_reasons_and_close():
    lines, body = split(status_response(503, "cluster down", close=True))
    assert b"Connection: close" in lines and body["reason"] == "ServiceUnavailable"
    assert split(status_response(504, "slow"))[1]["reason"] == "Timeout"
    assert split(status_response(401, "who"))[1]["reason"] == "Unauthorized"
