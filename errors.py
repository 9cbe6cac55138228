"""The one shape of every error the API returns."""


class ApiError(Exception):
    """An error a client sees: an HTTP status, a stable code and a readable message."""

    def __init__(self, status, code, message, headers=None):
        """An error answered with `status` and `{"error": {"code", "message"}}`."""
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self):
        """The JSON body of the error."""
        return {"error": {"code": self.code, "message": self.message}}
