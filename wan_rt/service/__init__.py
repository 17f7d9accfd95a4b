"""The video service: a job store, warm worker processes and an OpenAI-compatible HTTP API.

`VideoService` (service.py) is the in-process API; `wan_rt.service.http.create_app` puts the
OpenAI Videos API and the web page on it; `wan-rt serve` runs both.
"""

from wan_rt.service.jobs import InvalidRequest, Job, JobError, JobNotFound, QueueFull, VideoRequest
from wan_rt.service.service import VideoExpired, VideoNotReady, VideoService

__all__ = ["InvalidRequest", "Job", "JobError", "JobNotFound", "QueueFull", "VideoExpired", "VideoNotReady",
           "VideoRequest", "VideoService"]
