"""collage-inference: coded redundancy for low tail latency in image classification.

A front end sends each request to a single-image classifier (s-CNN) and, for every group of
k = S x S requests, one collage of their images to a collage-CNN that labels all k cells in one
pass. When an s-CNN answer is late, the collage cell answers instead.
"""

__version__ = "0.1.0"
