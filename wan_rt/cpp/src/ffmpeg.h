// FFmpeg's C libraries as the image reader and the mp4 writer use them. Private to the library.
#pragma once

extern "C" {
#include <libavcodec/avcodec.h>
#include <libavformat/avformat.h>
#include <libavutil/log.h>
#include <libavutil/opt.h>
#include <libswscale/swscale.h>
}

#include <string>

namespace wan_rt::detail {

// FFmpeg's text for an error code.
inline std::string av_error(int code) {
  char buf[AV_ERROR_MAX_STRING_SIZE] = {0};
  av_strerror(code, buf, sizeof(buf));
  return buf;
}

// FFmpeg logs to stderr by default; its errors come back as codes, which the callers report in
// their own one-line messages.
inline void quiet_ffmpeg() { av_log_set_level(AV_LOG_QUIET); }

// unique_ptr deleter for FFmpeg's free(T**) functions.
template <typename T, void (*Free)(T**)>
struct AvFree {
  void operator()(T* p) const { Free(&p); }
};

}  // namespace wan_rt::detail
