// mp4 files with FFmpeg's libraries, as `wan-rt run` writes them (wan_rt/video.py through the
// ffmpeg program): H.264 (libx264, yuv420p, CRF 18) at the model's frame rate; MPEG-4 Part 2 at a
// high quality where libavcodec was built without libx264. The file appears only when complete.
#pragma once

#include <cstdint>
#include <string>

namespace wan_rt {

// rgb: frames x height x width x 3 bytes, contiguous. Returns the codec used ("libx264" or "mpeg4").
std::string write_mp4(const std::string& path, const uint8_t* rgb, int64_t frames, int64_t height, int64_t width,
                      int fps);

}  // namespace wan_rt
