"""The directory as CSV: its file format (``format``), the import (``importer``, writing
through ``writer``, answering with ``report``) and the export (``exporter``)."""
