// SHA-256 (FIPS 180-4), self-contained: the runner checks artifact files against the manifest
// without linking a crypto library.
#ifndef SHIFTADD_RUNNER_SHA256_H_
#define SHIFTADD_RUNNER_SHA256_H_

#include <cstddef>
#include <cstdint>
#include <string>

namespace shiftadd {

class Sha256 {
 public:
  Sha256();
  void Update(const void* data, size_t size);
  /*! \brief Lower-case hex digest; the object must not be updated afterwards. */
  std::string HexDigest();

 private:
  void Block(const uint8_t* p);
  uint32_t h_[8];
  uint8_t buf_[64];
  size_t buf_len_ = 0;
  uint64_t total_ = 0;
};

/*! \brief Hex SHA-256 of a whole file; throws std::runtime_error when it cannot be read. */
std::string Sha256File(const std::string& path);

}  // namespace shiftadd

#endif  // SHIFTADD_RUNNER_SHA256_H_
