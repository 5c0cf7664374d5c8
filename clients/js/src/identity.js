// Identities (Ed25519 key pairs whose public key is the address) and strict
// signature verification.

import { ed25519 } from '@noble/curves/ed25519.js';
import { toHex, fromHex, bin, toBytes, randomBytes } from './bytes.js';


/**
 * Strict Ed25519 verification, matching ed25519-dalek's verify_strict:
 * canonical encodings, S < L, and no small-order public key or R.
 */
export function verifyStrict(sig, msg, publicKey) {
  try {
    sig = bin(sig, 64, 'signature');
    publicKey = bin(publicKey, 32, 'public key');
    const R = ed25519.Point.fromBytes(sig.subarray(0, 32), false);
    if (R.isSmallOrder()) return false;
    return ed25519.verify(sig, msg, publicKey, { zip215: false });
  } catch {
    return false;
  }
}

// ------------------------------------------------------------------ identity

/**
 * An Ed25519 key pair. The secret is the 32-byte RFC 8032 seed; the address
 * is the public key as 64 lowercase hex characters.
 */
export class Identity {
  #seed;
  #xsecret;
  constructor(seed) {
    this.#seed = Uint8Array.from(bin(seed, 32, 'seed'));
    /** The public key (32 bytes). */
    this.publicKey = ed25519.getPublicKey(this.#seed);
    /** The address: the public key in lowercase hex. */
    this.address = toHex(this.publicKey);
    Object.freeze(this);
  }
  static generate() {
    return new Identity(randomBytes(32));
  }
  static fromSeed(seed) {
    return new Identity(seed);
  }
  static fromSeedHex(hex) {
    return new Identity(fromHex(String(hex).trim()));
  }
  /**
   * The identity kept in browser storage under `storageKey`, created on first
   * use (and then kept across reloads).
   *
   * Storage choice: localStorage. It is the simplest persistent store that
   * every browser has, synchronous, per origin, and survives reloads and
   * restarts; the seed is exactly what any Ed25519 library needs, so it is
   * stored as 64 hex characters. The cost: any script running on this origin
   * can read it, so an XSS bug on the page would leak the key. (A
   * non-extractable WebCrypto key in IndexedDB would resist that, but
   * WebCrypto Ed25519 is not available in every browser yet and still could
   * not do the X25519 conversion sealing needs.) Serve the page with a strict
   * Content-Security-Policy and no third-party scripts.
   */
  static loadOrCreate(storageKey = 'w2w.identity', storage = globalThis.localStorage) {
    if (!storage) throw new Error('no localStorage here: pass a storage object');
    const saved = storage.getItem(storageKey);
    if (saved && /^[0-9a-fA-F]{64}$/.test(saved.trim())) return Identity.fromSeedHex(saved);
    const id = Identity.generate();
    storage.setItem(storageKey, id.seedHex());
    return id;
  }
  /** The secret seed (a copy). Keep it secret. */
  seed() {
    return Uint8Array.from(this.#seed);
  }
  seedHex() {
    return toHex(this.#seed);
  }
  sign(msg) {
    return ed25519.sign(toBytes(msg), this.#seed);
  }
  /** @internal X25519 secret for sealing (SHA-512 of the seed, first half, clamped). */
  _x25519Secret() {
    if (!this.#xsecret) this.#xsecret = ed25519.utils.toMontgomerySecret(this.#seed);
    return this.#xsecret;
  }
  toJSON() {
    return { address: this.address };
  }
}
