/* Grammar masks applied in place: logits[r, t] = -inf where bit t of row r's packed mask is clear.
 *
 * The mask is llguidance's layout: int32 words, bit i of word w set when token 32 w + i is allowed. Tokens at
 * or past n_tok (the model's vocabulary can be padded past the tokenizer's) are blocked. Work per word: none
 * when all 32 tokens are allowed, a fill when none is, one store per blocked token otherwise; single-threaded
 * (on a shared CPU an OpenMP region over 128K logits waits for its other thread; this loop takes microseconds).
 * Built by token_mask.py with the system C compiler and called through ctypes.
 */
#include <math.h>
#include <stdint.h>

void openr2_apply_token_bitmask(float *logits, int64_t row_stride, const uint32_t *mask, int64_t words,
                                int64_t rows, int64_t n_tok, int64_t vocab) {
  const float neg = -INFINITY;
  const int64_t limit = n_tok < vocab ? n_tok : vocab; /* tokens the mask decides */
  for (int64_t r = 0; r < rows; r++) {
    float *x = logits + r * row_stride;
    const uint32_t *m = mask + r * words;
    const int64_t used = (limit + 31) / 32 < words ? (limit + 31) / 32 : words;
    for (int64_t w = 0; w < used; w++) {
      uint32_t blocked = ~m[w];
      const int64_t base = 32 * w;
      if (!blocked) continue;
      if (blocked == 0xFFFFFFFFu && base + 32 <= limit) {
        for (int i = 0; i < 32; i++) x[base + i] = neg;
        continue;
      }
      while (blocked) {
        const int64_t t = base + __builtin_ctz(blocked);
        if (t >= limit) break;
        x[t] = neg;
        blocked &= blocked - 1;
      }
    }
    /* past the tokenizer, or past the mask's words: blocked */
    for (int64_t t = 32 * used < limit ? 32 * used : limit; t < vocab; t++) x[t] = neg;
  }
}
