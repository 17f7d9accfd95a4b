#include "wan_rt/image.h"

#include "ffmpeg.h"
#include "wan_rt/errors.h"

#include <cmath>
#include <filesystem>
#include <memory>

namespace wan_rt {
namespace {

using detail::av_error;
using detail::AvFree;

// ------------------------------------------------------------------ Pillow's resampling
// libImaging/Resample.c: per output pixel a window of input pixels weighted by the filter at the
// (possibly downscaled) distance, the weights normalised, turned into 22-bit fixed point, summed
// from a half, clipped; horizontal pass first, then vertical on the rows it needs.
constexpr int kPrecisionBits = 32 - 8 - 2;
constexpr double kLanczosSupport = 3.0;

double sinc(double x) {
  if (x == 0.0) return 1.0;
  x = x * M_PI;
  return std::sin(x) / x;
}

double lanczos(double x) {
  if (-3.0 <= x && x < 3.0) return sinc(x) * sinc(x / 3);
  return 0.0;
}

struct Coeffs {
  int64_t ksize;
  std::vector<int64_t> bounds;  // (first input index, count) per output index
  std::vector<int32_t> k;       // ksize fixed-point weights per output index
};

Coeffs precompute(int64_t in_size, double in0, double in1, int64_t out_size) {
  const double scale = (in1 - in0) / static_cast<double>(out_size);
  const double filterscale = scale < 1.0 ? 1.0 : scale;
  const double support = kLanczosSupport * filterscale;
  Coeffs c;
  c.ksize = static_cast<int64_t>(std::ceil(support)) * 2 + 1;
  c.bounds.resize(out_size * 2);
  c.k.assign(out_size * c.ksize, 0);
  std::vector<double> w(c.ksize);
  for (int64_t xx = 0; xx < out_size; ++xx) {
    const double center = in0 + (static_cast<double>(xx) + 0.5) * scale;
    const double ss = 1.0 / filterscale;
    int64_t xmin = static_cast<int64_t>(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    int64_t xmax = static_cast<int64_t>(center + support + 0.5);
    if (xmax > in_size) xmax = in_size;
    xmax -= xmin;
    double ww = 0.0;
    for (int64_t x = 0; x < xmax; ++x) {
      w[x] = lanczos((static_cast<double>(x + xmin) - center + 0.5) * ss);
      ww += w[x];
    }
    for (int64_t x = 0; x < xmax; ++x) {
      const double v = ww != 0.0 ? w[x] / ww : w[x];
      c.k[xx * c.ksize + x] = static_cast<int32_t>(v < 0 ? -0.5 + v * (1 << kPrecisionBits)
                                                         : 0.5 + v * (1 << kPrecisionBits));
    }
    c.bounds[xx * 2] = xmin;
    c.bounds[xx * 2 + 1] = xmax;
  }
  return c;
}

uint8_t clip8(int64_t v) {
  if (v >= (int64_t{1} << kPrecisionBits << 8)) return 255;
  if (v <= 0) return 0;
  return static_cast<uint8_t>(v >> kPrecisionBits);
}

// out(x) = sum_k in(bounds + k) * w_k along one axis; `stride` steps between input samples.
RgbImage resample_horizontal(const RgbImage& in, int64_t out_w, int64_t row0, int64_t rows, const Coeffs& c) {
  RgbImage out{out_w, rows, std::vector<uint8_t>(out_w * rows * 3)};
  for (int64_t y = 0; y < rows; ++y) {
    const uint8_t* src = &in.pixels[(y + row0) * in.width * 3];
    for (int64_t x = 0; x < out_w; ++x) {
      const int64_t xmin = c.bounds[x * 2], xmax = c.bounds[x * 2 + 1];
      const int32_t* k = &c.k[x * c.ksize];
      for (int ch = 0; ch < 3; ++ch) {
        int64_t ss = int64_t{1} << (kPrecisionBits - 1);
        for (int64_t i = 0; i < xmax; ++i) ss += int64_t{src[(i + xmin) * 3 + ch]} * k[i];
        out.pixels[(y * out_w + x) * 3 + ch] = clip8(ss);
      }
    }
  }
  return out;
}

RgbImage resample_vertical(const RgbImage& in, int64_t out_h, const Coeffs& c, int64_t shift) {
  RgbImage out{in.width, out_h, std::vector<uint8_t>(in.width * out_h * 3)};
  for (int64_t y = 0; y < out_h; ++y) {
    const int64_t ymin = c.bounds[y * 2] - shift, ymax = c.bounds[y * 2 + 1];
    const int32_t* k = &c.k[y * c.ksize];
    for (int64_t x = 0; x < in.width; ++x)
      for (int ch = 0; ch < 3; ++ch) {
        int64_t ss = int64_t{1} << (kPrecisionBits - 1);
        for (int64_t i = 0; i < ymax; ++i) ss += int64_t{in.pixels[((i + ymin) * in.width + x) * 3 + ch]} * k[i];
        out.pixels[(y * in.width + x) * 3 + ch] = clip8(ss);
      }
  }
  return out;
}

}  // namespace

RgbImage resize_lanczos(const RgbImage& image, int64_t width, int64_t height) {
  if (image.width == width && image.height == height) return image;
  const Coeffs horiz = precompute(image.width, 0.0, static_cast<double>(image.width), width);
  const Coeffs vert = precompute(image.height, 0.0, static_cast<double>(image.height), height);
  const bool need_h = width != image.width, need_v = height != image.height;
  if (!need_h) return resample_vertical(image, height, vert, 0);
  if (!need_v) return resample_horizontal(image, width, 0, image.height, horiz);
  // Pillow >= 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height loses
  // more than twice as many pixels as the width; the passes round in between, so the order shows.
  if (height < image.height && image.height - height > 2 * (image.width - width))
    return resample_horizontal(resample_vertical(image, height, vert, 0), width, 0, height, horiz);
  // Rows of the source the vertical pass reads; the horizontal pass makes only those.
  const int64_t first = vert.bounds[0], last = vert.bounds[height * 2 - 2] + vert.bounds[height * 2 - 1];
  return resample_vertical(resample_horizontal(image, width, first, last - first, horiz), height, vert, first);
}

namespace {

// Decode up to `max_frames` + 1 frames of the best video stream of `path` to RGB (one past the
// limit tells the caller it was crossed). `fail(why)` makes the caller's error; `check(w, h)`
// sees each frame's size before it is converted (and may throw).
template <typename Fail, typename Check>
std::vector<RgbImage> decode_frames(const std::string& path, int64_t max_frames, const Fail& fail,
                                    const Check& check) {
  detail::quiet_ffmpeg();
  AVFormatContext* raw = nullptr;
  int rc = avformat_open_input(&raw, path.c_str(), nullptr, nullptr);
  if (rc < 0) throw fail(av_error(rc));
  std::unique_ptr<AVFormatContext, AvFree<AVFormatContext, avformat_close_input>> fmt(raw);
  if ((rc = avformat_find_stream_info(fmt.get(), nullptr)) < 0) throw fail(av_error(rc));
  const AVCodec* codec = nullptr;
  const int stream = av_find_best_stream(fmt.get(), AVMEDIA_TYPE_VIDEO, -1, -1, &codec, 0);
  if (stream < 0 || codec == nullptr) throw fail("no picture stream");
  std::unique_ptr<AVCodecContext, AvFree<AVCodecContext, avcodec_free_context>> dec(avcodec_alloc_context3(codec));
  avcodec_parameters_to_context(dec.get(), fmt->streams[stream]->codecpar);
  if ((rc = avcodec_open2(dec.get(), codec, nullptr)) < 0) throw fail(av_error(rc));
  std::unique_ptr<AVPacket, AvFree<AVPacket, av_packet_free>> packet(av_packet_alloc());
  std::unique_ptr<AVFrame, AvFree<AVFrame, av_frame_free>> frame(av_frame_alloc());
  std::vector<RgbImage> out;
  auto take = [&] {  // every frame the decoder has ready
    while (static_cast<int64_t>(out.size()) <= max_frames && avcodec_receive_frame(dec.get(), frame.get()) >= 0) {
      if (frame->width <= 0 || frame->height <= 0) throw fail("no picture decoded");
      check(int64_t{frame->width}, int64_t{frame->height});
      RgbImage rgb{frame->width, frame->height, std::vector<uint8_t>(size_t(frame->width) * frame->height * 3)};
      // Pixel-format conversion only (same size): alpha dropped as PIL's convert("RGB") does.
      SwsContext* sws = sws_getContext(frame->width, frame->height, static_cast<AVPixelFormat>(frame->format),
                                       frame->width, frame->height, AV_PIX_FMT_RGB24,
                                       SWS_BICUBIC | SWS_ACCURATE_RND | SWS_FULL_CHR_H_INT, nullptr, nullptr, nullptr);
      if (sws == nullptr) throw fail("unsupported pixel format");
      uint8_t* dst[4] = {rgb.pixels.data(), nullptr, nullptr, nullptr};
      int dst_stride[4] = {static_cast<int>(rgb.width * 3), 0, 0, 0};
      sws_scale(sws, frame->data, frame->linesize, 0, frame->height, dst, dst_stride);
      sws_freeContext(sws);
      out.push_back(std::move(rgb));
    }
  };
  while (static_cast<int64_t>(out.size()) <= max_frames && av_read_frame(fmt.get(), packet.get()) >= 0) {
    if (packet->stream_index == stream && avcodec_send_packet(dec.get(), packet.get()) >= 0) take();
    av_packet_unref(packet.get());
  }
  avcodec_send_packet(dec.get(), nullptr);  // decoders that hold frames until flushed
  take();
  return out;
}

}  // namespace

RgbImage read_image(const std::string& path) {
  if (!std::filesystem::is_regular_file(path)) throw UsageError("image not found: " + path);
  auto fail = [&](const std::string& why) { return UsageError("cannot read image " + path + ": " + why); };
  auto frames = decode_frames(path, 0, fail, [](int64_t, int64_t) {});
  if (frames.empty()) throw fail("no picture decoded");
  return std::move(frames.front());
}

std::vector<RgbImage> read_video(const std::string& path, const VideoLimits& limits) {
  if (!std::filesystem::is_regular_file(path)) throw UsageError("video not found: " + path);
  const auto bytes = static_cast<int64_t>(std::filesystem::file_size(path));
  if (bytes > limits.max_bytes)
    throw UsageError("video " + path + " is " + std::to_string(bytes) + " bytes; the limit is " +
                     std::to_string(limits.max_bytes));
  auto fail = [&](const std::string& why) { return UsageError("cannot decode " + path + ": " + why); };
  auto frames = decode_frames(path, limits.max_frames, fail, [&](int64_t width, int64_t height) {
    if (width * height > limits.max_pixels)
      throw UsageError(path + " frames are " + std::to_string(width) + "x" + std::to_string(height) +
                       "; the limit is " + std::to_string(limits.max_pixels) + " pixels per frame");
  });
  if (frames.empty()) throw fail("no picture decoded");
  if (static_cast<int64_t>(frames.size()) > limits.max_frames)
    throw UsageError(path + " has more than " + std::to_string(limits.max_frames) + " frames (the limit)");
  return frames;
}

}  // namespace wan_rt
