import io

import numpy as np
import pytest
from PIL import Image

from collage_inference.config import load_config
from collage_inference.errors import PayloadTooLargeError, ProtocolError
from collage_inference.serving.payloads import first_multipart_part, images_from_tensor, parse_image_bytes
from collage_inference.serving.v2 import InferTensor


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_png_and_jpeg_decode_to_hwc():
    gray = np.arange(28 * 28, dtype=np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(parse_image_bytes(png(gray))[:, :, 0], gray)
    buf = io.BytesIO()
    Image.new("RGB", (10, 7), (200, 10, 10)).save(buf, format="JPEG")
    assert parse_image_bytes(buf.getvalue()).shape == (7, 10, 3)


def test_broken_and_huge_images_are_refused():
    with pytest.raises(ProtocolError, match="does not decode"):
        parse_image_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(PayloadTooLargeError, match="per side"):
        parse_image_bytes(png(np.zeros((1, 5000), np.uint8)))


@pytest.mark.parametrize(
    ("shape", "count"), [((28, 28), 1), ((28, 28, 1), 1), ((28, 28, 3), 1), ((4, 28, 28, 1), 4)]
)
def test_uint8_tensors_become_one_image_per_request(shape, count):
    images = images_from_tensor(InferTensor.of("image", np.zeros(shape, np.uint8)))
    assert len(images) == count and all(i.ndim == 3 for i in images)


def test_bytes_tensor_holds_files():
    data = np.array([png(np.zeros((5, 5), np.uint8)), png(np.ones((6, 6), np.uint8))], dtype=object)
    images = images_from_tensor(InferTensor.of("image", data))
    assert [i.shape for i in images] == [(5, 5, 1), (6, 6, 1)]


@pytest.mark.parametrize(
    ("array", "message"),
    [(np.zeros((28, 28), np.float32), "UINT8"), (np.zeros((2, 2, 28, 28, 1), np.uint8), "shape")],
)
def test_wrong_dtype_or_shape_says_what_to_send(array, message):
    with pytest.raises(ProtocolError, match=message):
        images_from_tensor(InferTensor.of("image", array))


def test_worker_argument():
    config = load_config(overrides={"scnn": ["http://127.0.0.1:8001#scnn"], "mode": "none"})
    assert (config.scnn[0].url, config.scnn[0].model) == ("http://127.0.0.1:8001", "scnn")
    with pytest.raises(Exception, match="URL#MODEL|HOST:PORT#MODEL"):
        load_config(overrides={"scnn": ["127.0.0.1:8001"], "mode": "none"})


def test_the_first_multipart_part_is_the_file():
    body = (
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
        b"Content-Type: image/png\r\n\r\nPNGDATA\r\n--XX--\r\n"
    )
    assert first_multipart_part(body, "multipart/form-data; boundary=XX") == b"PNGDATA"
    with pytest.raises(ProtocolError, match="no file"):
        first_multipart_part(b"--XX--\r\n", "multipart/form-data; boundary=XX")
