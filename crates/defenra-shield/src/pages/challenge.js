"use strict";
(function () {
  // SHA-256 (FIPS 180-4) in plain JavaScript: plain-HTTP pages have no WebCrypto, and where
  // the JIT runs this is faster than WebCrypto's promise per digest anyway.
  // The constants are the first 32 bits of the fractional parts of the square roots of the
  // first 8 primes (IV) and the cube roots of the first 64 (K), computed rather than listed;
  // typed arrays keep them 32-bit integers for the JIT.
  var K = new Int32Array(64), IV = new Int32Array(8);
  for (var prime = 2, count = 0; count < 64; prime++) {
    for (var divisor = 2; prime % divisor; divisor++);
    if (divisor === prime) {
      if (count < 8) IV[count] = (Math.sqrt(prime) % 1) * 0x100000000;
      K[count++] = (Math.cbrt(prime) % 1) * 0x100000000;
    }
  }

  // One compression of the block in w[0..16] into the state h.
  function compress(h, w) {
    var t, x, y;
    for (t = 16; t < 64; t++) {
      x = w[t - 15];
      y = w[t - 2];
      w[t] = ((x >>> 7 | x << 25) ^ (x >>> 18 | x << 14) ^ x >>> 3) +
        ((y >>> 17 | y << 15) ^ (y >>> 19 | y << 13) ^ y >>> 10) + w[t - 7] + w[t - 16] | 0;
    }
    var a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], k = h[7];
    for (t = 0; t < 64; t++) {
      x = k + ((e >>> 6 | e << 26) ^ (e >>> 11 | e << 21) ^ (e >>> 25 | e << 7)) +
        (e & f ^ ~e & g) + K[t] + w[t] | 0;
      y = ((a >>> 2 | a << 30) ^ (a >>> 13 | a << 19) ^ (a >>> 22 | a << 10)) +
        (a & b ^ a & c ^ b & c) | 0;
      k = g; g = f; f = e; e = d + x | 0; d = c; c = b; b = a; a = x + y | 0;
    }
    h[0] = h[0] + a | 0; h[1] = h[1] + b | 0; h[2] = h[2] + c | 0; h[3] = h[3] + d | 0;
    h[4] = h[4] + e | 0; h[5] = h[5] + f | 0; h[6] = h[6] + g | 0; h[7] = h[7] + k | 0;
  }

  // The state after the blocks of `bytes` (padded when `pad`, else a whole number of blocks).
  function hash(bytes, pad) {
    var n = bytes.length, blocks = pad ? (n + 8 >> 6) + 1 : n >> 6;
    var h = new Int32Array(IV), w = new Int32Array(64), i, j, at, v;
    for (var block = 0; block < blocks; block++) {
      for (i = 0; i < 16; i++) {
        for (v = 0, j = 0; j < 4; j++) {
          at = block * 64 + i * 4 + j;
          v = v << 8 | (at < n ? bytes[at] : at === n ? 0x80 : 0);
        }
        w[i] = v;
      }
      if (pad && block === blocks - 1) {
        w[14] = n / 0x20000000 | 0;
        w[15] = n << 3;
      }
      compress(h, w);
    }
    return h;
  }

  function hex(h) {
    var out = "";
    for (var i = 0; i < 8; i++) out += ("0000000" + (h[i] >>> 0).toString(16)).slice(-8);
    return out;
  }

  function utf8(text) {
    return new TextEncoder().encode(text);
  }

  function now() {
    return window.performance ? performance.now() : Date.now();
  }

  function enough(first, bits) {
    return bits === 0 || first >>> 32 - bits === 0;
  }

  // The first nonce in [from, to) that gives `bits` leading zero bits, or -1. A 64-character
  // challenge is exactly one block: hash it once, then only the block holding the nonce.
  function searchJs(challenge, bits, from, to) {
    var n, s, i, len;
    if (challenge.length !== 64) {
      for (n = from; n < to; n++) if (enough(hash(utf8(challenge + n), true)[0], bits)) return n;
      return -1;
    }
    var mid = hash(utf8(challenge), false), h = new Int32Array(8), w = new Int32Array(64);
    for (n = from; n < to; n++) {
      s = String(n);
      len = s.length;
      for (i = 0; i < 16; i++) w[i] = 0;
      for (i = 0; i < len; i++) w[i >> 2] |= s.charCodeAt(i) << 24 - 8 * (i & 3);
      w[len >> 2] |= 0x80 << 24 - 8 * (len & 3);
      w[15] = 64 + len << 3;
      h.set(mid);
      compress(h, w);
      if (enough(h[0], bits)) return n;
    }
    return -1;
  }

  // The same with WebCrypto, a batch of digests at a time (each digest is a promise, so
  // one at a time would spend more time waiting than hashing).
  function searchWebCrypto(challenge, bits, from, to) {
    var jobs = [];
    for (var n = from; n < to; n++) jobs.push(crypto.subtle.digest("SHA-256", utf8(challenge + n)));
    return Promise.all(jobs).then(function (digests) {
      for (var i = 0; i < digests.length; i++) {
        if (enough(new DataView(digests[i]).getUint32(0), bits)) return from + i;
      }
      return -1;
    });
  }

  function solve(form) {
    var status = document.getElementById("defenra-status");
    if (!navigator.cookieEnabled) {
      status.textContent = "This check needs cookies, which your browser has turned off for this site.";
      return;
    }
    var fields = form.elements, challenge = fields.challenge.value, bits = +fields.difficulty.value;
    // WebCrypto only exists in secure contexts, and where the JIT runs, pure JavaScript is
    // faster than a promise per digest: race them on a first batch and keep the winner.
    var webCrypto = !!(window.isSecureContext && window.crypto && crypto.subtle);
    var next = 0, started = now();
    function found(nonce) {
      if (nonce >= 0) {
        fields.nonce.value = nonce;
        fields.engine.value = (webCrypto ? "webcrypto " : "js ") + Math.round(now() - started) + "ms";
        status.textContent = "Done. Loading the page\u2026";
        form.submit();
        return;
      }
      status.textContent = "Checking your browser\u2026 (" + next + " tries)";
      // A WebCrypto batch already waited for its digests; pure JavaScript yields here so
      // the page stays responsive.
      if (webCrypto) step(); else setTimeout(step, 0);
    }
    function fallBack(from) {
      return function () {
        webCrypto = false;
        next = from;
        step();
      };
    }
    function step() {
      var from = next, nonce = -1, until = now() + 50;
      if (webCrypto) {
        next += 512;
        searchWebCrypto(challenge, bits, from, next).then(found, fallBack(from));
        return;
      }
      while (nonce < 0 && now() < until) {
        nonce = searchJs(challenge, bits, next, next + 4096);
        next += 4096;
      }
      found(nonce);
    }
    function race() {
      var t0 = now(), nonce = searchJs(challenge, bits, 0, 2048), t1 = now();
      if (nonce >= 0 || !webCrypto) {
        next = 2048;
        return found(nonce);
      }
      searchWebCrypto(challenge, bits, 2048, 2560).then(function (nonce) {
        // Per attempt: 2048 in JavaScript took t1 - t0, 512 digests took the rest.
        webCrypto = (now() - t1) * 4 < t1 - t0;
        next = 2560;
        found(nonce);
      }, fallBack(2048));
    }
    race();
  }

  // For the page's own tests and for tools: SHA-256 in hex, and both searches.
  window.defenraChallenge = {
    sha256: function (text) { return hex(hash(utf8(text), true)); },
    searchJs: searchJs,
    searchWebCrypto: searchWebCrypto
  };
  var form = document.getElementById("defenra-challenge");
  if (form) solve(form);
})();
