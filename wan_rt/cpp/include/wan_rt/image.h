// First frames for image-to-video and source videos for video-to-video: decoded with FFmpeg (PNG, JPEG, WebP, BMP, ...) and resized as
// wan_rt's Python runtime does (wan_rt/video.py: PIL's Image.resize with LANCZOS, which diffusers'
// VideoProcessor uses). The resize repeats Pillow's fixed-point separable Lanczos exactly (Pillow
// >= 13's order of the two passes; older Pillow can differ by one level where the height shrinks
// much more than the width does), so an image decoded to the same RGB bytes gives the same pixels. Lossless formats decode to
// the same bytes as Pillow; JPEG goes through FFmpeg's decoder and YUV->RGB conversion, which can
// differ from Pillow's libjpeg by a level or two.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace wan_rt {

struct RgbImage {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> pixels;  // rows of width x RGB
};

// UsageError "image not found: PATH" or "cannot read image PATH: why".
RgbImage read_image(const std::string& path);

// A source video's bounds: wan_rt/video.py's MAX_VIDEO_BYTES, MAX_VIDEO_FRAMES, MAX_VIDEO_PIXELS.
struct VideoLimits {
  int64_t max_bytes = int64_t{64} << 20;
  int64_t max_frames = 321;
  int64_t max_pixels = 1920 * 1088;  // per frame
};

// Every frame of a video file (mp4 or anything FFmpeg reads), RGB; the one-line UsageErrors of
// wan_rt.video.load_video ("video not found: PATH", over a bound, "cannot decode PATH: why").
std::vector<RgbImage> read_video(const std::string& path, const VideoLimits& limits = {});

// Pillow's Image.resize((width, height), Image.LANCZOS) on an RGB image (a copy when the size is
// already that).
RgbImage resize_lanczos(const RgbImage& image, int64_t width, int64_t height);

}  // namespace wan_rt
