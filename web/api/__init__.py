"""The programmatic APIs: REST ``/api/v1`` and the AUTOMATIC1111-compatible ``/sdapi/v1``, both
authenticated by API keys (``storage.apikeys``)."""
