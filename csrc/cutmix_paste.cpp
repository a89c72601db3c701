// See cutmix_paste.h.
#include "cutmix_paste.h"

#include <ATen/Parallel.h>

#include <cstdint>
#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace transmix {
namespace {

struct Box {
  int64_t y0, y1, x0, x1;
  int64_t height() const { return y1 - y0; }
  int64_t width() const { return x1 - x0; }
};

template <typename Word>
inline void copy_as(char* __restrict dst, const char* __restrict src, int64_t bytes) {
  Word* d = reinterpret_cast<Word*>(dst);
  const Word* s = reinterpret_cast<const Word*>(src);
  const int64_t n = bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t i = 0; i < n; ++i) d[i] = s[i];
}

// Copies `bytes` (a multiple of the element size `item`) between non-overlapping buffers.
inline void copy_words(char* dst, const char* src, int64_t bytes, int64_t item) {
  if (item == 4) {
    copy_as<uint32_t>(dst, src, bytes);
  } else if (item == 2) {
    copy_as<uint16_t>(dst, src, bytes);
  } else {
    std::memcpy(dst, src, bytes);
  }
}

template <typename Word>
inline void swap_as(char* __restrict a, char* __restrict b, int64_t bytes) {
  Word* x = reinterpret_cast<Word*>(a);
  Word* y = reinterpret_cast<Word*>(b);
  const int64_t n = bytes / static_cast<int64_t>(sizeof(Word));
  for (int64_t i = 0; i < n; ++i) {
    const Word t = x[i];
    x[i] = y[i];
    y[i] = t;
  }
}

// Swaps `bytes` between two non-overlapping ranges (different images).
inline void swap_words(char* a, char* b, int64_t bytes, int64_t item) {
  if (item == 4) {
    swap_as<uint32_t>(a, b, bytes);
  } else if (item == 2) {
    swap_as<uint16_t>(a, b, bytes);
  } else {
    swap_as<unsigned char>(a, b, bytes);
  }
}

// Numbers in messages go through std::to_string, never through TORCH_CHECK's ostream (that
// crashed in libstdc++ on a device image whose compiler differs from torch's; see rollout.cpp).
std::string str(int64_t value) { return std::to_string(value); }

std::vector<Box> read_boxes(const at::Tensor& boxes, int64_t height, int64_t width) {
  const at::Tensor b = boxes.to(at::kLong).contiguous();
  const int64_t* p = b.data_ptr<int64_t>();
  std::vector<Box> out(b.size(0));
  for (int64_t i = 0; i < b.size(0); ++i) {
    out[i] = Box{p[4 * i], p[4 * i + 1], p[4 * i + 2], p[4 * i + 3]};
    TORCH_CHECK(0 <= out[i].y0 && out[i].y0 <= out[i].y1 && out[i].y1 <= height && 0 <= out[i].x0 &&
                    out[i].x0 <= out[i].x1 && out[i].x1 <= width,
                "cutmix_paste_cpu_: box " + str(i) + " is outside the " + str(height) + "x" + str(width) +
                    " image or inverted");
  }
  return out;
}

}  // namespace

void cutmix_paste_cpu_(at::Tensor images, const at::Tensor& boxes, const at::Tensor& partner) {
  TORCH_CHECK(images.device().is_cpu() && boxes.device().is_cpu() && partner.device().is_cpu(),
              "cutmix_paste_cpu_: images, boxes and partner must be CPU tensors");
  TORCH_CHECK(images.dim() == 4, "cutmix_paste_cpu_: images must be (B, C, H, W), got " + str(images.dim()) + " dims");
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2),
                width = images.size(3);
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(0) == batch && boxes.size(1) == 4,
              "cutmix_paste_cpu_: boxes must be (" + str(batch) + ", 4)");
  TORCH_CHECK(partner.dim() == 1 && partner.size(0) == batch && partner.scalar_type() == at::kLong,
              "cutmix_paste_cpu_: partner must be (" + str(batch) + ",) int64");
  const bool nchw = images.is_contiguous();
  const bool nhwc = !nchw && images.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(nchw || nhwc, "cutmix_paste_cpu_: images must be contiguous or channels_last");

  const std::vector<Box> box = read_boxes(boxes, height, width);
  const at::Tensor partner_c = partner.contiguous();
  const int64_t* src_of = partner_c.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(0 <= src_of[b] && src_of[b] < batch, "cutmix_paste_cpu_: partner[" + str(b) + "] out of range");
  }
  const int64_t item = images.element_size();
  // A row segment: NCHW moves w pixels of one channel; channels_last moves w pixels x C channels.
  const int64_t segments_per_row = nchw ? channels : 1;
  const int64_t segment_items = nchw ? 1 : channels;
  char* base = static_cast<char*>(images.data_ptr());
  const int64_t sb = images.stride(0) * item, sc = images.stride(1) * item, sh = images.stride(2) * item,
                sw = images.stride(3) * item;

  // Moves every row segment of sample b's box between image `image` and `stage`, in a fixed order.
  auto for_each_segment = [&](int64_t b, int64_t image, char* stage, auto&& move) {
    const Box& bx = box[b];
    const int64_t bytes = bx.width() * segment_items * item;
    for (int64_t s = 0; s < segments_per_row; ++s) {
      for (int64_t y = bx.y0; y < bx.y1; ++y) {
        move(base + image * sb + s * sc + y * sh + bx.x0 * sw, stage, bytes);
        stage += bytes;
      }
    }
  };
  // Box rows of small images are short (a 32-px row of floats is 128 bytes) and there are tens of
  // thousands of them: an inlined loop over 2- or 4-byte words beats a memcpy call per segment.
  auto gather = [item](char* pixels, char* stage, int64_t n) { copy_words(stage, pixels, n, item); };
  auto scatter = [item](char* pixels, char* stage, int64_t n) { copy_words(pixels, stage, n, item); };
  auto box_bytes = [&](int64_t b) { return box[b].height() * box[b].width() * channels * item; };

  bool involution = true;  // partner pairs samples up (the flipped batch, pair mode, any swap)
  for (int64_t b = 0; b < batch && involution; ++b) {
    involution = src_of[src_of[b]] == b;
  }
  if (involution) {
    // Only b and p = partner[b] read or write each other's pixels, so each pair is done on its
    // own, in place: inside both boxes the two images swap, inside b's box only b takes p's
    // pixels (p keeps them there), inside p's box only p takes b's. Each pixel moves once.
    const int64_t pixel = segment_items * item;  // bytes of one pixel of a row segment (== sw)
    auto copy_outside = [&](char* dst_row, const char* src_row, const Box& bx, int64_t lo, int64_t hi) {
      if (hi <= lo) {  // no overlap on this row: the whole box row
        copy_words(dst_row + bx.x0 * sw, src_row + bx.x0 * sw, bx.width() * pixel, item);
        return;
      }
      copy_words(dst_row + bx.x0 * sw, src_row + bx.x0 * sw, (lo - bx.x0) * pixel, item);
      copy_words(dst_row + hi * sw, src_row + hi * sw, (bx.x1 - hi) * pixel, item);
    };
    auto swap_pair = [&](int64_t b, int64_t p) {
      const Box& bb = box[b];
      const Box& bp = box[p];
      const int64_t y_lo = std::min(bb.y0, bp.y0), y_hi = std::max(bb.y1, bp.y1);
      for (int64_t s = 0; s < segments_per_row; ++s) {
        for (int64_t y = y_lo; y < y_hi; ++y) {
          char* row_b = base + b * sb + s * sc + y * sh;
          char* row_p = base + p * sb + s * sc + y * sh;
          const bool in_b = bb.y0 <= y && y < bb.y1 && bb.x0 < bb.x1;
          const bool in_p = bp.y0 <= y && y < bp.y1 && bp.x0 < bp.x1;
          int64_t lo = 0, hi = 0;  // overlap [lo, hi) of the two boxes' columns on this row
          if (in_b && in_p) {
            lo = std::max(bb.x0, bp.x0);
            hi = std::max(lo, std::min(bb.x1, bp.x1));
            swap_words(row_b + lo * sw, row_p + lo * sw, (hi - lo) * pixel, item);
          }
          if (in_b) copy_outside(row_b, row_p, bb, lo, hi);
          if (in_p) copy_outside(row_p, row_b, bp, lo, hi);
        }
      }
    };
    // Each pair once, from its smaller index; a sample paired with itself keeps its pixels. The
    // pairs are listed first so that the threads share them evenly: for the flipped batch every
    // smaller index lies in the first half, which a split of [0, batch) would give to one thread.
    std::vector<int64_t> leaders;
    leaders.reserve(batch / 2 + 1);
    for (int64_t b = 0; b < batch; ++b) {
      if (src_of[b] > b) leaders.push_back(b);
    }
    at::parallel_for(0, static_cast<int64_t>(leaders.size()), 8, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) swap_pair(leaders[i], src_of[leaders[i]]);
    });
    return;
  }
  // Any other partner map: gather every box first (all reads), then scatter (all writes).
  std::vector<int64_t> offset(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    offset[b + 1] = offset[b] + box_bytes(b);
  }
  if (offset[batch] == 0) {
    return;
  }
  // Uninitialised staging (a std::vector would zero-fill it first: a full extra pass).
  std::unique_ptr<char[]> staging(new char[offset[batch]]);
  at::parallel_for(0, batch, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) for_each_segment(b, src_of[b], staging.get() + offset[b], gather);
  });
  at::parallel_for(0, batch, 8, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) for_each_segment(b, b, staging.get() + offset[b], scatter);
  });
}

}  // namespace transmix
