"""The error type for problems the user can fix (bad data, config values, weights files, folders).

Raise ``UserError`` with a message that names the culprit (file, image id, annotation id, field,
config key). The command line prints such errors in a few lines and exits with code 2, without a
traceback (``--debug`` or ``CODETR_DEBUG=1`` shows it).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in the user's input; the message names the file, id, field or key at fault."""


class DatasetError(UserError, ValueError):
    """A COCO-format dataset the loader cannot use: malformed or inconsistent annotations, image
    sizes that differ from the JSON, files outside the images folder, no annotations to learn from."""


class ImageFileError(UserError, OSError):
    """An image file that cannot be read: missing, not an image, truncated or corrupt, or larger
    than the decompression-bomb limit (``data.max_image_pixels``)."""


class FileMissingError(UserError, FileNotFoundError):
    """A file the user named (annotations, images, weights, config) does not exist."""


class TrainingDiverged(UserError, FloatingPointError):
    """The loss, its gradients or the model's outputs stopped being finite during training."""


class FileWriteError(UserError, OSError):
    """A file codetr writes could not be written (a full disk, no permission); the message names it and
    says that its previous content is unchanged."""
