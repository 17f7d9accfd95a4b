#include "wan_rt/video_writer.h"

#include "ffmpeg.h"

#include <filesystem>
#include <memory>
#include <stdexcept>

namespace wan_rt {
namespace {

void check(int rc, const std::string& what) {
  if (rc < 0) throw std::runtime_error("mp4: " + what + ": " + detail::av_error(rc));
}

// One open output file: muxer, encoder, RGB -> YUV converter; the destructor releases them all.
struct Mp4Encoder {
  AVFormatContext* fmt = nullptr;
  AVCodecContext* enc = nullptr;
  AVStream* stream = nullptr;
  SwsContext* sws = nullptr;
  AVFrame* frame = nullptr;
  AVPacket* packet = nullptr;

  ~Mp4Encoder() {
    if (fmt && fmt->pb) avio_closep(&fmt->pb);
    avformat_free_context(fmt);
    avcodec_free_context(&enc);
    sws_freeContext(sws);
    av_frame_free(&frame);
    av_packet_free(&packet);
  }

  // Drain what the encoder has ready (all of it when flushing) into the file.
  void drain() {
    while (true) {
      const int rc = avcodec_receive_packet(enc, packet);
      if (rc == AVERROR(EAGAIN) || rc == AVERROR_EOF) return;
      check(rc, "encode");
      // Each packet shows for one frame. Left at 0, the last frame would have no duration: the
      // file would say (frames - 1) / fps seconds and a rate above fps, and readers that size
      // their output from those would drop or garble the last frame.
      if (packet->duration <= 0) packet->duration = 1;  // in enc->time_base: 1 / fps
      av_packet_rescale_ts(packet, enc->time_base, stream->time_base);
      packet->stream_index = stream->index;
      check(av_interleaved_write_frame(fmt, packet), "write");
    }
  }
};

}  // namespace

std::string write_mp4(const std::string& path, const uint8_t* rgb, int64_t frames, int64_t height, int64_t width,
                      int fps) {
  detail::quiet_ffmpeg();
  const std::filesystem::path target(path);
  const auto tmp = target.parent_path() / ("." + target.stem().string() + ".partial.mp4");
  const AVCodec* codec = avcodec_find_encoder_by_name("libx264");
  const std::string name = codec ? "libx264" : "mpeg4";
  if (!codec) codec = avcodec_find_encoder(AV_CODEC_ID_MPEG4);
  if (!codec) throw std::runtime_error("mp4: libavcodec has neither libx264 nor an MPEG-4 encoder");
  try {
    Mp4Encoder m;
    check(avformat_alloc_output_context2(&m.fmt, nullptr, "mp4", tmp.c_str()), "output");
    m.stream = avformat_new_stream(m.fmt, nullptr);
    m.enc = avcodec_alloc_context3(codec);
    m.enc->width = static_cast<int>(width);
    m.enc->height = static_cast<int>(height);
    m.enc->pix_fmt = AV_PIX_FMT_YUV420P;
    m.enc->time_base = AVRational{1, fps};
    m.enc->framerate = AVRational{fps, 1};
    if (m.fmt->oformat->flags & AVFMT_GLOBALHEADER) m.enc->flags |= AV_CODEC_FLAG_GLOBAL_HEADER;
    if (name == "libx264") {
      av_opt_set(m.enc->priv_data, "crf", "18", 0);
    } else {
      m.enc->flags |= AV_CODEC_FLAG_QSCALE;  // mpeg4: fixed high quality
      m.enc->global_quality = FF_QP2LAMBDA * 2;
    }
    check(avcodec_open2(m.enc, codec, nullptr), "open " + name);
    check(avcodec_parameters_from_context(m.stream->codecpar, m.enc), "stream");
    m.stream->time_base = m.enc->time_base;
    m.stream->avg_frame_rate = m.enc->framerate;
    check(avio_open(&m.fmt->pb, tmp.c_str(), AVIO_FLAG_WRITE), "open " + tmp.string());
    check(avformat_write_header(m.fmt, nullptr), "header");
    m.sws = sws_getContext(static_cast<int>(width), static_cast<int>(height), AV_PIX_FMT_RGB24, static_cast<int>(width),
                           static_cast<int>(height), AV_PIX_FMT_YUV420P, SWS_BICUBIC, nullptr, nullptr, nullptr);
    m.frame = av_frame_alloc();
    m.packet = av_packet_alloc();
    m.frame->format = AV_PIX_FMT_YUV420P;
    m.frame->width = static_cast<int>(width);
    m.frame->height = static_cast<int>(height);
    check(av_frame_get_buffer(m.frame, 0), "frame");
    for (int64_t i = 0; i < frames; ++i) {
      check(av_frame_make_writable(m.frame), "frame");
      const uint8_t* src[4] = {rgb + i * height * width * 3, nullptr, nullptr, nullptr};
      const int src_stride[4] = {static_cast<int>(width * 3), 0, 0, 0};
      sws_scale(m.sws, src, src_stride, 0, static_cast<int>(height), m.frame->data, m.frame->linesize);
      m.frame->pts = i;
      check(avcodec_send_frame(m.enc, m.frame), "encode");
      m.drain();
    }
    check(avcodec_send_frame(m.enc, nullptr), "flush");
    m.drain();
    check(av_write_trailer(m.fmt), "trailer");
  } catch (...) {
    std::filesystem::remove(tmp);
    throw;
  }
  std::filesystem::rename(tmp, target);
  return name;
}

}  // namespace wan_rt
