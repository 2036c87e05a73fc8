"""A gallery that raises KeyboardInterrupt at one item: a Ctrl-C arriving mid-extraction, without signals."""

from __future__ import annotations

from PIL import Image

from retrieval.data.gallery import Gallery


class InterruptedGallery(Gallery):
    """The same gallery, but reading item ``stop_at`` raises KeyboardInterrupt, as Ctrl-C would there."""

    def __init__(self, gallery: Gallery, stop_at: int) -> None:
        self.__dict__.update(gallery.__dict__)
        self.stop_at = stop_at

    def load_image(self, i: int) -> Image.Image:
        if i == self.stop_at:
            raise KeyboardInterrupt
        return super().load_image(i)
